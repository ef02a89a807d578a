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
