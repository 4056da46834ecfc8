"""The per-shape CPU kernel choice for ControlNet convolutions and linear layers, and batch norms folded into annotator
convolutions: the same numbers as the layers they replace, training and other layers untouched."""
import copy

import pytest
import torch
from torch import nn

from annotators.batchnorm_folding import fold_batchnorms
from annotators.runtime import prepare
from lib_controlnet import cpu_kernels
from lib_controlnet.cpu_kernels import FastestKernelConv2d, FastestKernelLinear, use_fastest_kernels

SHAPES = [  # (in, out, kernel, stride, dilation, side)
    (8, 16, 3, 1, 1, 20), (16, 16, 3, 2, 1, 17), (64, 64, 3, 1, 1, 4), (12, 12, 3, 1, 5, 16), (6, 10, 1, 1, 1, 9)]


@pytest.fixture(autouse=True)
def fresh_choices():
    cpu_kernels.forget_choices()
    yield
    cpu_kernels.forget_choices()


def _conv(cin, cout, k, stride=1, dilation=1, groups=1):
    torch.manual_seed(cin * 100 + cout)
    return nn.Conv2d(cin, cout, k, stride=stride, padding=dilation * (k // 2), dilation=dilation,
                     groups=groups).eval()


@pytest.mark.parametrize("cin, cout, k, stride, dilation, side", SHAPES)
def test_both_kernels_and_the_timed_choice_equal_the_plain_convolution(cin, cout, k, stride, dilation, side):
    plain = _conv(cin, cout, k, stride, dilation)
    fast = use_fastest_kernels(copy.deepcopy(plain))
    assert type(fast) is FastestKernelConv2d and isinstance(fast, nn.Conv2d)
    assert fast.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, cin, side, side)
    with torch.inference_mode():
        expected = plain(x)
        torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-5)  # first call: timed choice
        (key, kernel), = cpu_kernels.chosen_kernels().items()
        assert kernel in ("oneDNN", "GEMM") and key[:2] == ("conv", tuple(x.shape))
        for default in (True, False):  # each kernel, whichever the timing picked
            cpu_kernels._choices[key] = default
            torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-5)


def test_grouped_huge_and_padded_convolutions_keep_the_default_kernel():
    cases = [(_conv(12, 12, 3, groups=12), torch.randn(1, 12, 16, 16)),
             (_conv(64, 8, 7), torch.randn(1, 64, 200, 200)),  # im2col buffer over the limit
             (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect").eval(), torch.randn(1, 4, 9, 9)),
             (nn.Conv2d(4, 4, 3, padding="same").eval(), torch.randn(1, 4, 9, 9))]
    with torch.inference_mode():
        for plain, x in cases:
            fast = use_fastest_kernels(copy.deepcopy(plain))
            torch.testing.assert_close(fast(x), plain(x))
    assert cpu_kernels.chosen_kernels() == {}


def test_training_runs_the_default_path_and_gets_gradients():
    plain = _conv(4, 8, 3, 1, 1).train()
    fast = use_fastest_kernels(copy.deepcopy(plain))
    x = torch.randn(1, 4, 10, 10, requires_grad=True)
    fast(x).sum().backward()
    assert cpu_kernels.chosen_kernels() == {}
    plain_x = x.detach().clone().requires_grad_(True)
    plain(plain_x).sum().backward()
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad)
    torch.testing.assert_close(x.grad, plain_x.grad)


def test_a_bad_input_raises_as_the_plain_convolution_does():
    fast = use_fastest_kernels(_conv(4, 8, 3))
    with torch.inference_mode(), pytest.raises(RuntimeError):
        fast(torch.randn(1, 5, 8, 8))  # wrong channel count


LINEARS = [  # (input shape, in, out, bias)
    ((6, 32), 32, 48, True), ((2, 77, 64), 64, 96, False), ((2, 50, 40), 40, 160, True)]


@pytest.mark.parametrize("shape, cin, cout, bias", LINEARS)
def test_linear_layers_run_either_kernel_with_the_plain_result_and_repeat_the_first_call(shape, cin, cout, bias):
    torch.manual_seed(cin + cout)
    plain = nn.Linear(cin, cout, bias=bias).eval()
    fast = use_fastest_kernels(copy.deepcopy(plain))
    assert type(fast) is FastestKernelLinear and fast.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(*shape)
    with torch.inference_mode():
        expected = plain(x)
        first = fast(x)  # timed choice: must hand back what every later call returns
        assert torch.equal(first, fast(x)), cpu_kernels.chosen_kernels()
        torch.testing.assert_close(first, expected, atol=1e-5, rtol=1e-5)
        (key, kernel), = cpu_kernels.chosen_kernels().items()
        assert kernel in ("BLAS", "oneDNN") and key[:2] == ("linear", tuple(shape))
        for default in (True, False):
            cpu_kernels._choices[key] = default
            torch.testing.assert_close(fast(x), expected, atol=1e-5, rtol=1e-5)


def test_linear_training_keeps_the_default_path():
    plain = nn.Linear(8, 4)
    fast = use_fastest_kernels(copy.deepcopy(plain))
    x = torch.randn(3, 8, requires_grad=True)
    fast(x).sum().backward()
    plain(x.detach().requires_grad_(True)).sum().backward()
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad)
    assert cpu_kernels.chosen_kernels() == {}


def test_a_strided_linear_input_runs_either_kernel_with_the_plain_result():
    # a transformer's proj_in reads its feature map through a permuted view (B, H*W, C of a B, C, H, W tensor)
    torch.manual_seed(4)
    plain = nn.Linear(16, 24).eval()
    fast = use_fastest_kernels(copy.deepcopy(plain))
    strided = torch.randn(2, 16, 5, 5).permute(0, 2, 3, 1).reshape(2, 25, 16)
    assert not strided.is_contiguous()
    with torch.inference_mode():
        expected = plain(strided)
        assert torch.equal(fast(strided), fast(strided))
        (key, _), = cpu_kernels.chosen_kernels().items()
        for default in (True, False):
            cpu_kernels._choices[key] = default
            torch.testing.assert_close(fast(strided), expected, atol=1e-5, rtol=1e-5)


def test_a_controlnet_runs_the_same_on_the_fastest_kernels():
    from lib_controlnet import tiny_models

    plain = tiny_models.tiny_controlnet("sd15").eval()
    fast = use_fastest_kernels(copy.deepcopy(plain))
    size = plain.config.cross_attention_dim
    args = (torch.randn(2, 4, 8, 8), torch.tensor(10), torch.randn(2, 5, size))
    hint = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expected = plain(*args, controlnet_cond=hint)
        for _ in range(2):  # the timed first call, then the chosen kernels
            got = fast(*args, controlnet_cond=hint)
            for a, b in zip([*got.down_block_res_samples, got.mid_block_res_sample],
                            [*expected.down_block_res_samples, expected.mid_block_res_sample]):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)  # float sums in another order
    assert len(cpu_kernels.chosen_kernels()) > 3


def _conv_bn_net():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8)),
                        nn.BatchNorm2d(8))  # a batch norm after a non-convolution stays
    return _with_random_stats(net)


def _with_random_stats(net):
    for norm in net.modules():
        if isinstance(norm, nn.BatchNorm2d):
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
            norm.weight.data.uniform_(0.5, 1.5)
            norm.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


def test_batch_norms_fold_into_their_convolutions_with_the_same_output():
    net = _conv_bn_net()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = net(x)
        folded = prepare(copy.deepcopy(net), channels_last=False)
        torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=1e-5)
    kinds = [type(m).__name__ for m in folded.modules()]
    assert kinds.count("BatchNorm2d") == 1 and kinds.count("Identity") == 2
    assert kinds.count("Conv2d") == 2  # annotators keep PyTorch's default kernel (reproducible maps)


class _Block(nn.Module):
    """A ResNet-style block: its convolutions and norms are attributes its forward calls in turn."""

    def __init__(self, reuse_conv_output=False, shape_branch=False):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.reuse_conv_output, self.shape_branch = reuse_conv_output, shape_branch

    def forward(self, x):
        if self.shape_branch and x.shape[-1] > 100:  # fx cannot trace a branch on a traced shape
            return x
        out = self.relu(self.bn1(self.conv1(x)))
        features = self.conv2(out)
        out = self.bn2(features)
        return out + features if self.reuse_conv_output else out + x


@pytest.mark.parametrize("block, folds", [
    (dict(), 2),
    (dict(reuse_conv_output=True), 1),  # conv2's own output is used past its norm: that pair stays
    (dict(shape_branch=True), 0),  # a forward fx cannot trace keeps its norms
])
def test_batch_norms_a_forward_calls_after_a_convolution_fold(block, folds):
    torch.manual_seed(2)
    net = _with_random_stats(nn.Sequential(_Block(**block), _Block(**block)))
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        expected = net(x)
        folded = copy.deepcopy(net)
        assert fold_batchnorms(folded) == 2 * folds
        torch.testing.assert_close(folded(x), expected, atol=1e-5, rtol=1e-5)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 2 * (2 - folds)


def test_a_convolution_shared_between_places_keeps_its_norm():
    torch.manual_seed(3)
    block = _with_random_stats(_Block())
    net = nn.Sequential(block, nn.Sequential(block.conv1, nn.ReLU()))  # conv1 also runs without bn1
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        expected = net(x)
        assert fold_batchnorms(net) == 1  # conv2 + bn2 only
        torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-5)
    assert isinstance(block.bn1, nn.BatchNorm2d) and isinstance(block.bn2, nn.Identity)


def test_batch_norms_in_training_mode_are_left_alone():
    net = _conv_bn_net().train()
    fold_batchnorms(net)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 3


def test_half_precision_runs_on_either_kernel():
    plain = _conv(16, 16, 3).to(torch.bfloat16)
    fast = use_fastest_kernels(copy.deepcopy(plain))
    x = torch.randn(1, 16, 6, 6, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), plain(x), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("cin, cout, k, stride, dilation, side", SHAPES + [(3, 32, 3, 1, 1, 96), (4, 32, 3, 1, 1, 64)])
def test_the_first_call_of_a_shape_returns_what_later_calls_return(cin, cout, k, stride, dilation, side):
    # The first call times both kernels; it must hand back the winner's output, or the first image after a start
    # differs from every repeat with the same seed (seen in a real WebUI: the first SDXL canny image was off).
    fast = use_fastest_kernels(_conv(cin, cout, k, stride, dilation))
    x = torch.randn(1, cin, side, side)
    with torch.inference_mode():
        first, again = fast(x), fast(x)
    assert torch.equal(first, again), cpu_kernels.chosen_kernels()
