import subprocess
import sys


def test_diffusers_and_controlnet_aux_import_after_package_import():
    code = ("import lib_controlnet, torch; from diffusers import ControlNetModel; import transformers; "
            "from torchvision.ops import nms; "
            "b = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60.]]); "
            "print(nms(b, torch.tensor([.9, .8, .7]), .5).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[0, 2]"


def test_repair_is_a_no_op_when_torchvision_works_or_is_absent():
    # A process where torchvision is absent: ensure_torchvision says so and declares nothing.
    code = ("import sys; sys.modules['torchvision'] = None; "
            "from lib_controlnet import compat; "
            "print(compat.ensure_torchvision(), compat.torchvision_was_repaired())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False False"
