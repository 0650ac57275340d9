"""Deprecated location: the runtime layer is ``edgecli.runtimes``; ORT helpers live in ``edgecli.runtimes.ort``."""

from edgecli.runtimes.ort import available_providers, make_session, resolve_providers, run_batched  # noqa: F401
