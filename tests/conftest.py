import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def sd3():
    """A tiny real SD3Transformer2DModel (eval mode) and one batch of inputs for it."""
    from rsr_model.backbones import tiny_sd3

    torch.manual_seed(0)
    model = tiny_sd3(num_layers=4).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 3, 32, 32, generator=g),
                  encoder_hidden_states=torch.randn(2, 8, 384, generator=g),
                  pooled_projections=torch.randn(2, 384, generator=g),
                  timestep=torch.tensor([700.0, 30.0]))
    return model, inputs


@pytest.fixture
def dit():
    from rsr_model.backbones import tiny_dit

    torch.manual_seed(0)
    model = tiny_dit(num_layers=4).eval()  # eval: DiT drops class labels at random in train mode
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 1, 16, 16, generator=g), timestep=torch.tensor([700.0, 30.0]),
                  class_labels=torch.tensor([3, 7]))
    return model, inputs


def run(model, inputs):
    return model(**inputs).sample


def randomize_rsr(rsr, scale=0.05, seed=0):
    """Give the (zero-initialised) B factors values so that adapters change the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in rsr.values():
            layer.experts.B.copy_(torch.randn(layer.experts.B.shape, generator=g) * scale)


def one_error_line(err: str) -> str:
    """The message of a command that failed as every command must: exactly one `error:` line on
    stderr, the last line (progress bars of work done before the failure may precede it), and
    no traceback. Returns that line."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]
