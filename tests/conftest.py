"""Settings for the whole test session."""
import atexit
import os
import shutil
import tempfile

# torch.compile's on-disk caches (inductor's FX graphs, AOTAutograd's) key a
# graph without the extension's build, so after a rebuild a test could run
# a graph traced against the old ops and pass or fail for it (found in
# review). A fresh directory per session, unless the caller chose one.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="fastclip-tests-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

# Under emulation (.ci/aarch64 runs the tests in qemu, about 20x slower than
# natively) Hypothesis's draws of large tensors can take it past its
# too_slow health check, a verdict on the machine rather than the code
# (found there: one draw took 45 s while other jobs shared the cores).
if os.environ.get("FASTCLIP_TESTS_SLOW_MACHINE", "") not in ("", "0"):
    try:
        from hypothesis import HealthCheck, settings

        settings.register_profile("slow-machine", suppress_health_check=[HealthCheck.too_slow])
        settings.load_profile("slow-machine")
    except ImportError:  # the property tests skip without Hypothesis
        pass
