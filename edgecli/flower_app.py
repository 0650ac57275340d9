"""The Flower App objects for Flower's deployment engine (``deploy/flower/pyproject.toml`` names them).

Imported only by Flower's SuperLink/SuperNode processes: it needs the ``privacy`` extra (flwr).
The ServerApp runs edgecli's train stage with the SuperLink's Grid (``server_main`` below:
an entry point like the CLI, so the one module besides cli.py that runs a stage);
the ClientApp is the one the simulation runs (``edgecli.federated.client_train``).
"""

import shlex
import sys

from flwr.serverapp import ServerApp

from edgecli.errors import ConfigError
from edgecli.federated import make_client_app


def server_main(grid, context) -> None:
    """The ServerApp's main on a SuperLink: the same train stage, its clients the connected SuperNodes.

    Run config: ``edgecli-config`` (path of the pipeline YAML on the SuperLink machine) and
    ``edgecli-set`` (--set items separated by spaces, shell-quoted). Publishes ``<artifacts_dir>/<name>/train`` there.
    """
    from edgecli.artifacts import ArtifactStore
    from edgecli.config import load_config
    from edgecli.stages import train

    overrides = shlex.split(str(context.run_config.get("edgecli-set", "")))
    cfg = load_config(str(context.run_config["edgecli-config"]), overrides)
    if cfg.train.federated is None:
        raise ConfigError(f"{cfg.source}: train.federated is not set; nothing to run on Flower")
    res = train.run(cfg, ArtifactStore(cfg.artifacts_dir, cfg.name), force=True, grid=grid)
    print(f"train {res.status}: {res.dir} (test accuracy {res.metrics.get('test_accuracy')})", file=sys.stderr)


server_app = ServerApp()
server_app.main()(server_main)
client_app = make_client_app()
