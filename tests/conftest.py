"""Test setup: a fake 8-device CPU mesh (must be set before jax is imported) and shared paths."""
import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# One persistent XLA cache for the whole run: the pytest-xdist workers and the tests' subprocesses (CLI, kill -9,
# two-process, notebook) compile many identical programs (same tiny configs); each is compiled once.
_CACHE = os.environ.setdefault("LATENT_JAX_TEST_XLA_CACHE", f"/tmp/latent_jax_test_xla_cache_{os.getuid()}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)  # inherited by the subprocesses
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

if os.environ.get("LATENT_JAX_TEST_SCAN_ALL") == "1":  # the whole suite on scanned layers (BUILD_NOTES, issue 20)
    import latent_jax.config

    latent_jax.config.SCAN_MIN_LAYERS = 1
    latent_jax.config.SCAN_ON_CPU = True

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(os.environ.get("LATENT_JAX_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
    if not SHARED.is_dir():
        pytest.skip(f"shared/ folder not found at {SHARED} (set LATENT_JAX_SHARED)")
    return SHARED
