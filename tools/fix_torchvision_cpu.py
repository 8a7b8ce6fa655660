"""CPU install step: make PyPI's (CUDA) torchvision importable next to a CPU-only torch.

PyPI's torchvision wheel carries C++ ops built for CUDA torch; beside torch+cpu they fail to load
and `import torchvision` dies in `_meta_registrations.py` (`operator torchvision::nms does not
exist`), which breaks open_clip, timm and transformers' Qwen2-VL processor. This patches that file
so its `register_fake` calls run only when the ops loaded (`torchvision.extension._has_ops()`).
Pure-Python transforms then work; C++ ops (nms, roi_align, io.decode_jpeg) still raise, which is
why unicap decodes images with Pillow. Idempotent; does nothing when torchvision imports cleanly.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

MARK = "# unicap: register_fake only when the C++ ops loaded"
HELPER = f"""

{MARK}
def _unicap_register_fake(name):
    def wrapper(fn):
        if torchvision.extension._has_ops():
            return torch.library.register_fake(name)(fn)
        return fn

    return wrapper
"""


def imports_cleanly() -> bool:
    return subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True).returncode == 0


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or imports_cleanly():
        print("torchvision: imports cleanly, nothing to fix")
        return 0
    path = Path(spec.origin).parent / "_meta_registrations.py"
    src = path.read_text()
    if MARK not in src:
        anchor = "def register_meta("
        if anchor not in src or "@torch.library.register_fake(" not in src:
            print(f"torchvision: unexpected layout of {path}; cannot apply the CPU fix", file=sys.stderr)
            return 1
        src = src.replace("@torch.library.register_fake(", "@_unicap_register_fake(")
        src = src.replace(anchor, HELPER.lstrip("\n") + "\n\n" + anchor, 1)
        path.write_text(src)
    if not imports_cleanly():
        print("torchvision: still fails to import after the CPU fix", file=sys.stderr)
        return 1
    print(f"torchvision: patched {path} for a CPU-only torch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
