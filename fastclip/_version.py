__version__ = "0.1.0"

# The oldest torch the suite passes on (under 2.4 over 100 tests failed:
# APIs fastclip mirrors or uses, such as torch.nn.utils.get_total_norm and
# torch.distributed.tensor, are missing there).
MIN_TORCH = (2, 6)
# What a version string that names no release reads as: not refused.
UNKNOWN_RELEASE = (99, 0)


def torch_release(version: str) -> tuple:
    """(major, minor) of a torch version string ("2.6.0a0+git1234" -> (2, 6))."""
    parts = version.split("+")[0].split(".")[:2]
    if len(parts) < 2 or not all(part.isdigit() for part in parts):
        return UNKNOWN_RELEASE
    return tuple(int(part) for part in parts)
