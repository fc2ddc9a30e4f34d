import logging

# On CPUs with AVX512-BF16, bitsandbytes warns at import that an optional kernel, fetched from the model
# hub by the `kernels` package, is missing. refcal never downloads at run time; bitsandbytes' built-in
# CPU path is used instead, so the warning is noise.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
