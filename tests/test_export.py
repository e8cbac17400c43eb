"""Patched torchvision and transformers models (built from configs: no weights are downloaded)
under torch.compile(fullgraph=True) and torch.export (issue 14 item 2): sparseops adds no graph
break, the compiled and the exported model follow mask edits, and the exported program gives the
eager model's results."""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import sparseops
from sparseops.patch import patched_layers

torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _resnet18():
    return torchvision.models.resnet18(num_classes=10), (torch.randn(2, 3, 32, 32),)


def _vgg11():
    return torchvision.models.vgg11(num_classes=10), (torch.randn(1, 3, 32, 32),)


def _bert():
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    return transformers.BertForSequenceClassification(config), (torch.randint(0, 120, (2, 12)),)


def _gpt2():
    config = transformers.GPT2Config(vocab_size=120, n_embd=32, n_layer=2, n_head=2, n_positions=32, use_cache=False)
    return transformers.GPT2LMHeadModel(config), (torch.randint(0, 120, (2, 12)),)


MODELS = {"resnet18": _resnet18, "vgg11": _vgg11, "bert": _bert, "gpt2": _gpt2}


def _model(name):
    torch.manual_seed(0)
    model, args = MODELS[name]()
    return model.eval(), args


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _prune(model, sparsity, seed):
    """A random mask of `sparsity` on every patched layer (set in place: the buffers stay)."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in patched_layers(model):
        layer.set_mask(torch.rand(layer.weight.shape, generator=gen) >= sparsity)


def _breaks(model, args):
    return torch._dynamo.explain(model)(*args).graph_break_count


@pytest.mark.parametrize("name", sorted(MODELS))
def test_patching_adds_no_graph_break(name):
    """torch._dynamo.explain's graph breaks of the patched model are the unpatched model's (none for
    these models), before and after pruning."""
    model, args = _model(name)
    before = _breaks(model, args)
    sparseops.patch(model, on_unsupported="ignore")
    assert _breaks(model, args) == before <= 2
    _prune(model, 0.9, 0)
    torch._dynamo.reset()
    assert _breaks(model, args) == before


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fullgraph_model_follows_mask_edits(name):
    """fullgraph=True compiles the whole patched model; the compiled model follows IMP's pruning
    (full -> 50% -> 95%) as eager does, without recompiling."""
    model, args = _model(name)
    sparseops.patch(model, on_unsupported="ignore")
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for level, sparsity in enumerate((0.0, 0.5, 0.95)):
            if sparsity:
                _prune(model, sparsity, level)
            torch.testing.assert_close(_logits(compiled(*args)), _logits(model(*args)), rtol=1e-4, atol=1e-4)
    assert counter.frame_count == 1


@pytest.mark.parametrize("name", ["resnet18", "bert", "gpt2"])
def test_export(name):
    """torch.export of the patched, pruned model: the exported program gives eager's results, and
    mask edits after export (on the exported module's buffers) are seen by it."""
    model, args = _model(name)
    sparseops.patch(model, on_unsupported="ignore")
    _prune(model, 0.8, 0)
    with torch.no_grad():
        want = _logits(model(*args))
        program = torch.export.export(model, args)
        exported = program.module()
        torch.testing.assert_close(_logits(exported(*args)), want, rtol=1e-4, atol=1e-4)
        # the masks are inputs of the program (its buffers), not constants folded in at export time
        masks = {n.removesuffix(".weight_mask"): b for n, b in exported.named_buffers() if n.endswith("weight_mask")}
        layers = dict(patched_layers(model))
        assert masks.keys() == layers.keys()
        for i, (n, layer) in enumerate(layers.items()):  # a new level: every other layer emptied, the rest denser
            new = torch.zeros_like(layer.weight_mask) if i % 2 else torch.rand(layer.weight.shape) >= 0.3
            layer.set_mask(new)
            masks[n].copy_(new)
        torch.testing.assert_close(_logits(exported(*args)), _logits(model(*args)), rtol=1e-4, atol=1e-4)


def test_exported_program_saves_loads_and_exports_strict():
    """The exported program of a pruned resnet18 survives torch.export.save / load (the runtime ops
    are found by name once sparseops is imported) with eager's results; strict export (dynamo)
    works too."""
    import io

    model, args = _model("resnet18")
    sparseops.patch(model)
    _prune(model, 0.9, 1)
    with torch.no_grad():
        want = model(*args)
        buffer = io.BytesIO()
        torch.export.save(torch.export.export(model, args, strict=True), buffer)
        buffer.seek(0)
        loaded = torch.export.load(buffer)
        assert any("masked_conv2d_runtime" in str(n.target) for n in loaded.graph.nodes)
        torch.testing.assert_close(loaded.module()(*args), want, rtol=1e-4, atol=1e-4)
