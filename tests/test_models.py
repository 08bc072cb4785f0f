import pytest
import torch

from mpiml.models import ModelError, build_model


@pytest.mark.parametrize("name", ["logreg", "mlp", "cnn"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (64,), (8, 8)])
def test_models_map_samples_to_logits(name, shape):
    model = build_model(name, shape, 10, (32, 16))
    out = model(torch.randn(5, *shape))
    assert out.shape == (5, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_mlp_hidden_layers():
    model = build_model("mlp", (20,), 3, (7, 5))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(20, 7), (7, 5), (5, 3)]


@pytest.mark.parametrize("args, match", [
    (("cnn", (5,), 3), "image-shaped"),
    (("resnet", (5,), 3), "unknown model 'resnet'"),
    (("mlp", (5,), 1), "at least 2 classes"),
])
def test_model_errors(args, match):
    with pytest.raises(ModelError, match=match):
        build_model(*args)
