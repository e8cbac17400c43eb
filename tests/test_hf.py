"""Hugging Face round trips (issue 14 item 7): a patched model saved with save_pretrained (or by a
Trainer checkpoint) comes back with its masks through sparseops.hf.from_pretrained; the plain path
refuses to be patched over silently; safetensors' save_model/load_model with tied patched weights.
Tiny models built from configs: no hub, no network."""
import warnings

import pytest
import torch
from torch import nn

import sparseops
from sparseops import tickets
from sparseops.patch import patched_layers

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("sparseops.hf")


def _bert():
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=100, max_position_embeddings=32)
    return transformers.BertForSequenceClassification(cfg).eval()


def _gpt2():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


MODELS = {"bert": _bert, "gpt2": _gpt2}


def _pruned(kind):
    torch.manual_seed(0)
    model = MODELS[kind]()
    sparseops.patch(model, on_unsupported="ignore")
    tickets.set_masks(model, tickets.magnitude_masks(model, 0.9))
    return model


def _ids():
    return torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))


def _assert_same(loaded, model):
    assert tickets.get_masks(loaded).keys() == tickets.get_masks(model).keys()
    for k, m in tickets.get_masks(model).items():
        assert torch.equal(tickets.get_masks(loaded)[k], m), k
    with torch.no_grad():
        torch.testing.assert_close(loaded(_ids()).logits, model(_ids()).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_from_pretrained_restores_masks(tmp_path, kind):
    model = _pruned(kind)
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(type(model), tmp_path).eval()
    _assert_same(loaded, model)


def test_from_pretrained_with_an_auto_class(tmp_path):
    model = _pruned("gpt2")
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(transformers.AutoModelForCausalLM, tmp_path).eval()
    assert type(loaded) is type(model)
    _assert_same(loaded, model)


def test_from_pretrained_reads_pytorch_model_bin(tmp_path):
    model = _pruned("gpt2")
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    _assert_same(hf.from_pretrained(type(model), tmp_path).eval(), model)


def test_from_pretrained_reads_sharded_folders(tmp_path):
    model = _pruned("bert")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    _assert_same(hf.from_pretrained(type(model), tmp_path).eval(), model)


def test_from_pretrained_soft_scores(tmp_path):
    torch.manual_seed(0)
    model = sparseops.patch(_bert(), mode="soft", on_unsupported="ignore")
    with torch.no_grad():
        for _, m in patched_layers(model):
            m.weight_score.normal_()
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(type(model), tmp_path).eval()
    for (name, a), (_, b) in zip(patched_layers(model),
                                 patched_layers(loaded)):
        assert isinstance(b, sparseops.nn._SoftMaskedMixin), name
        assert torch.equal(a.weight_score, b.weight_score), name


def test_from_pretrained_of_a_plain_folder_patches_all_ones(tmp_path):
    model = _bert()
    model.save_pretrained(tmp_path)
    loaded = hf.from_pretrained(type(model), tmp_path)
    assert all(bool(m.all()) for m in tickets.get_masks(loaded).values()) and tickets.get_masks(loaded)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_plain_from_pretrained_then_patch_refuses(tmp_path, kind):
    """The plain path loads a dense model with the pruned weights' stale values (transformers calls
    the mask keys ignorable); patching that model must not pass for the pruned one."""
    model = _pruned(kind)
    model.save_pretrained(tmp_path)
    plain = type(model).from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="sparseops.hf.from_pretrained"):
        tickets.set_masks(plain, tickets.get_masks(model))
    with pytest.raises(ValueError, match="sparseops.hf.from_pretrained"):
        sparseops.patch(plain, on_unsupported="ignore")
    del plain.config.sparseops  # the documented way to patch the dense model anyway
    sparseops.patch(plain, on_unsupported="ignore")


def test_unpatched_model_saves_a_plain_folder(tmp_path):
    model = _pruned("bert")
    ref = model(_ids()).logits
    sparseops.unpatch(model)
    model.save_pretrained(tmp_path)
    plain = type(model).from_pretrained(tmp_path).eval()
    sparseops.patch(plain, on_unsupported="ignore")  # a folded dense model: nothing to refuse
    torch.testing.assert_close(plain(_ids()).logits, ref, rtol=0, atol=1e-6)


def _trainer(model, out, steps):
    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            ids = _ids()[i % 2]
            return {"input_ids": ids, "labels": torch.tensor(i % 2)}

    args = transformers.TrainingArguments(output_dir=str(out), max_steps=steps, save_steps=steps, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, learning_rate=1e-2, save_strategy="steps")
    return transformers.Trainer(model=model, args=args, train_dataset=Data())


def test_trainer_checkpoint_round_trip(tmp_path):
    pytest.importorskip("accelerate")
    model = _pruned("bert").train()
    _trainer(model, tmp_path, 2).train()
    ckpt = tmp_path / "checkpoint-2"
    loaded = hf.from_pretrained(type(model), ckpt).eval()
    _assert_same(loaded, model.eval())
    # resuming into a patched model keeps the masks and trains on
    fresh = sparseops.patch(_bert(), on_unsupported="ignore").train()
    _trainer(fresh, tmp_path, 3).train(resume_from_checkpoint=str(ckpt))
    for k, m in tickets.get_masks(model).items():
        assert torch.equal(tickets.get_masks(fresh)[k], m), k


# ---- safetensors' save_model / load_model with tied weights --------------------------------------


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("make", [_Tied, _gpt2], ids=["tied-linear", "gpt2"])
def test_safetensors_save_load_model_tied(tmp_path, make):
    st = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    model = sparseops.patch(make(), on_unsupported="ignore")
    tickets.set_masks(model, tickets.magnitude_masks(model, 0.8))
    st.save_model(model, tmp_path / "m.safetensors")
    fresh = sparseops.patch(make(), on_unsupported="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st.load_model(fresh, tmp_path / "m.safetensors")
    for k, m in tickets.get_masks(model).items():
        assert torch.equal(tickets.get_masks(fresh)[k], m), k
    x = torch.randn(3, 8) if make is _Tied else _ids()
    with torch.no_grad():
        out = (lambda m: m(x)) if make is _Tied else (lambda m: m.eval()(x).logits)
        torch.testing.assert_close(out(fresh), out(model), rtol=0, atol=0)
