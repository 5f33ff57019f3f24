"""tunesmith: fine-tune small chat models on your own conversations, then chat with and serve them."""

import os

__version__ = "0.1.0"

# The CUDA caching allocator grows its segments instead of cutting new ones: less fragmentation, so fewer
# out-of-memory errors at the same allocated peak (torchtune and Unsloth set the same). Used by the command line
# and the benchmark's tunesmith process before torch is imported; a value the user set wins.
CUDA_ALLOC_CONF = "expandable_segments:True"


def set_allocator_default() -> None:
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)
