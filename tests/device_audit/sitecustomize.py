"""Start-up hook of the device audit (tests/train/test_devices.py puts this folder first on PYTHONPATH).

With UNICAP_DEVICE_AUDIT=<folder> set, every process (trainer ranks, `unicap sample`, ...) runs under a
TorchFunctionMode that records each tensor factory call (torch.zeros, torch.tensor, torch.randn, ...) made from
the project's own files without a `device` argument: on a GPU such a tensor lands on the CPU and meets CUDA
tensors later (issue 19: the sampler's noise, the trainer's collectives). Findings are appended to
<folder>/<pid>.txt as they happen, so a process that ends with os._exit loses none; <folder>/<pid>.started
shows that the audit ran at all.
"""

import os

if os.environ.get("UNICAP_DEVICE_AUDIT"):
    from tests.device_audit.mode import install

    install(os.environ["UNICAP_DEVICE_AUDIT"])
