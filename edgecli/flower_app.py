"""The Flower App objects for Flower's deployment engine (``deploy/flower/pyproject.toml`` names them).

Imported only by Flower's SuperLink/SuperNode processes: it needs the ``privacy`` extra (flwr).
The ServerApp runs edgecli's train stage with the SuperLink's Grid (``edgecli.federated.server_main``);
the ClientApp is the one the simulation runs (``edgecli.federated.client_train``).
"""

from flwr.serverapp import ServerApp

from edgecli.federated import make_client_app, server_main

server_app = ServerApp()
server_app.main()(server_main)
client_app = make_client_app()
