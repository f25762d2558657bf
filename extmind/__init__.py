"""extmind: the shared client-side pieces (CLI, launcher, clients) of the extmind services."""

import os

# gRPC's C core logs through absl, which prints INFO lines unless GRPC_VERBOSITY says otherwise: a
# connection's GOAWAY while `extmind up` stopped a cluster that failed to start put such a line
# ahead of the one error line the launcher promises (tests/e2e/test_lifecycle.py). Our processes
# report gRPC's failures themselves; its own errors still print. Set before any grpc import here.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
