"""Prints the folders (joined by ':') that hold cuBLAS 13, NVRTC 13 and cuDNN 9: a CUDA
toolkit's, or PyTorch's nvidia-* wheels'. scripts/gpu-check.sh puts them on LD_LIBRARY_PATH."""
import glob
import os
import site

roots = site.getsitepackages() + ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib", "/usr/lib/x86_64-linux-gnu"]
dirs = set()
for root in roots:
    for name in ("libcublas.so.13", "libcublasLt.so.13", "libnvrtc.so.13", "libcudnn.so.9"):
        dirs.update(os.path.dirname(f) for f in glob.glob(os.path.join(root, "**", name), recursive=True))
print(":".join(sorted(dirs)))
