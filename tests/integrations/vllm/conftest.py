"""The vLLM connector's tests need vLLM (``make`` installs it); in CI (``EPD_REQUIRE_VLLM=1``) they never skip."""

from __future__ import annotations

import os


def vllm_missing() -> str | None:
    try:
        import vllm.distributed.ec_transfer.ec_connector.factory
        import vllm.v1.request  # noqa: F401
    except ImportError as error:
        return f"vLLM's EC connector modules cannot be imported: {error}"
    return None


MISSING = vllm_missing()
if MISSING and os.environ.get("EPD_REQUIRE_VLLM"):
    raise RuntimeError(f"EPD_REQUIRE_VLLM is set but {MISSING}")
