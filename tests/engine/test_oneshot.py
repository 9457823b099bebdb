"""One-shot calibration pruning: activation criteria, bias compensation, and perplexity.

Every case prunes a tiny model built here, checks slim == sparse (the compensated sparse model
included), that what was changed is what the criterion or the compensation says, and that the
slim and sparse models reload from their files.
"""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
import torch.nn as nn

import prunekit
from helpers import assert_equivalent, run
from prunekit.engine.calibration import collect_input_stats, compensate
from prunekit.engine.plan import PruningPlan
from prunekit.workflow.evaluation import make_eval_fn

HAVE_HF = importlib.util.find_spec("transformers") is not None
needs_hf = pytest.mark.skipif(not HAVE_HF, reason="transformers is not installed: pip install 'prunekit[hf]'")


def mlp(hidden: int = 8, bias: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3, bias=bias)).eval()


def batches(n: int = 3, size: int = 32, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 4, generator=g) for _ in range(n)]


@torch.no_grad()
def dead_and_constant(model: nn.Sequential) -> None:
    """Hidden 0-1: never active (large weights, bias -100); 2-3: constant 5 (no weight, bias 5)."""
    fc = model[0]
    fc.weight[0:2] = 3.0
    fc.bias[0:2] = -100.0
    fc.weight[2:4] = 0.0
    fc.bias[2:4] = 5.0
    fc.weight[4:] = torch.randn(4, 4, generator=torch.Generator().manual_seed(3)) * 0.1
    fc.bias[4:] = 0.5
    model[2].weight[:, 0:4] = 2.0  # heavy columns: an L2 criterion keeps these channels


def test_activation_criteria_read_input_statistics():
    """'activation' prunes the dead channels, 'fluctuation' the dead and constant ones; l2 neither."""
    model = mlp()
    dead_and_constant(model)
    pruner = prunekit.Pruner(model, torch.randn(2, 4))
    stats = pruner.collect_activations(batches())
    assert stats["2.weight"].count == 96 and stats["2.weight"].in_dim == 1
    [group] = pruner.prunable_groups
    gone = {c: set(pruner.plan(0.25, criterion=c).pruned["2.weight"][1]) for c in ("activation", "fluctuation", "l2")}
    assert gone["activation"] == {0, 1}
    assert gone["fluctuation"] <= {0, 1, 2, 3} and len(gone["fluctuation"]) == 2
    assert set(pruner.plan(0.5, criterion="fluctuation").pruned["2.weight"][1]) == {0, 1, 2, 3}
    assert not gone["l2"] & {0, 1, 2, 3}
    var = stats["2.weight"].var
    assert float(var[:4].abs().max()) < 1e-9 < float(var[4:].min())
    assert group.n_units == 8


def test_activation_criterion_needs_calibration():
    model = mlp()
    pruner = prunekit.Pruner(model, torch.randn(2, 4))
    with pytest.raises(ValueError, match="collect_activations"):
        pruner.plan(0.5, criterion="activation")
    with pytest.raises(ValueError, match="calibration="):
        prunekit.prune(model, torch.randn(2, 4), removal_ratio=0.3, criterion="fluctuation", log=lambda m: None)
    with pytest.raises(ValueError, match="compensate=True need"):
        prunekit.prune(model, torch.randn(2, 4), removal_ratio=0.3, compensate=True, log=lambda m: None)
    with pytest.raises(ValueError, match="calibration batches are empty"):
        collect_input_stats(model, [])


def test_compensation_keeps_the_mean_output():
    """Removing the constant channels costs nothing with compensation (their mean goes to a new bias)."""
    model = mlp()
    dead_and_constant(model)
    x = batches(1, 64, seed=7)[0]
    dense = run(model, x)
    plan = PruningPlan(
        {"0.weight": {0: [2, 3]}, "0.bias": {0: [2, 3]}, "2.weight": {1: [2, 3]}},
        {"0.weight": [8, 4], "0.bias": [8], "2.weight": [3, 8]},
    )
    plain = copy.deepcopy(model)
    prunekit.apply_plan(plain, plan)
    stats = collect_input_stats(model, batches())
    out = compensate(model, plan, stats)
    assert out.meta["added_biases"] == {"2.bias": [3]} and "2.bias" not in out.pruned
    assert out.meta["compensated"] == ["2.weight"]
    prunekit.apply_plan(model, out)
    assert prunekit.max_error(dense, run(model, x)) < 1e-6 < prunekit.max_error(dense, run(plain, x))
    assert "2.bias" not in plan.meta.get("added_biases", {})  # the given plan is unchanged


def test_compensated_prune_is_sparse_equals_slim_and_reloads(tmp_path):
    model = mlp(16)
    x = torch.randn(4, 4)
    cal = batches()
    res = prunekit.prune(
        model, x, removal_ratio=0.4, criterion="fluctuation", calibration=cal, compensate=True, log=lambda m: None
    )
    assert res.plan.meta["added_biases"] == {"2.bias": [3]}
    assert isinstance(model[2].bias, nn.Parameter)
    slim = prunekit.to_slim(model)
    assert_equivalent(run(model, x), run(slim, x), "compensated mlp")
    assert slim[2].bias is not None and slim[2].in_features < 16
    prunekit.save_slim(slim, tmp_path / "slim")
    again = prunekit.load_slim(mlp(16), tmp_path / "slim")
    assert torch.equal(run(slim, x), run(again, x))
    prunekit.save_sparse(model, tmp_path / "sparse")
    back = prunekit.load_sparse(mlp(16), tmp_path / "sparse")
    assert torch.equal(run(model, x), run(back, x))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(12)
        self.conv2 = nn.Conv2d(12, 10, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(10)
        self.fc = nn.Linear(10, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def conv_net() -> ConvNet:
    torch.manual_seed(0)
    net = ConvNet()
    with torch.no_grad():
        for bn in (net.bn1, net.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.bias.uniform_(-0.2, 1.0)
    return net.eval()


def test_conv_compensation_creates_pruned_biases(tmp_path):
    """conv2 gets a bias; where conv2's own outputs are pruned too, its new bias is pruned with them."""
    model = conv_net()
    x = torch.randn(2, 3, 8, 8)
    cal = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    res = prunekit.prune(
        model, x, removal_ratio=0.4, criterion="activation", calibration=cal, compensate=True, log=lambda m: None
    )
    added = res.plan.meta["added_biases"]
    assert set(added) == {"conv2.bias"}  # conv1's inputs (the image) stay; fc has a bias already
    assert res.plan.meta["compensated"] == ["conv2.weight", "fc.weight"]
    assert "conv2.bias" in res.plan.pruned and res.plan.pruned["conv2.bias"][0] == res.plan.pruned["conv2.weight"][0]
    slim = prunekit.to_slim(model)
    assert_equivalent(run(model, x), run(slim, x), "compensated conv net")
    prunekit.save_slim(slim, tmp_path / "slim")
    again = prunekit.load_slim(conv_net(), tmp_path / "slim")
    assert torch.equal(run(slim, x), run(again, x))


def test_compensation_helps_one_shot():
    """On a model whose removed channels carry a mean, compensation keeps the outputs closer."""
    model = conv_net()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    cal = [torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(6))]
    dense = run(model, x)
    errs = {}
    for comp in (False, True):
        m = copy.deepcopy(model)
        prunekit.prune(
            m, x, removal_ratio=0.3, criterion="activation", calibration=cal, compensate=comp, log=lambda s: None
        )
        errs[comp] = prunekit.max_error(dense, run(m, x))
    assert errs[True] < errs[False]


def test_ana_takes_calibration(tmp_path):
    model = mlp(16)
    x = torch.randn(8, 4)
    ref = run(model, x)

    def score(m):
        return -float((run(m, x) - ref).abs().mean())

    sens = prunekit.ana(
        model,
        x,
        score,
        workspace=tmp_path,
        ratios=(0.25, 0.5),
        criterion="activation",
        calibration=batches(),
        progress=False,
        log=lambda m: None,
    )
    assert sens.curves and all(v <= 0 for c in sens.curves.values() for v in c.values())


# ----- perplexity ---------------------------------------------------------------------------
class TinyLM(nn.Module):
    def __init__(self, vocab: int = 13) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, vocab)

    def forward(self, ids):
        return self.head(self.emb(ids))


def test_perplexity_of_a_plain_lm_states_its_length():
    ids = torch.randint(0, 13, (3, 20), generator=torch.Generator().manual_seed(0))
    lm = TinyLM().eval()
    fn = make_eval_fn([ids], "perplexity", seq_len=10)
    value = fn(lm)
    with torch.no_grad():
        logits = lm(ids)
    want = 0.0
    for part in (slice(0, 10), slice(10, 20)):
        lo, t = logits[:, part][:, :-1], ids[:, part][:, 1:]
        want += float(nn.functional.cross_entropy(lo.reshape(-1, 13).double(), t.reshape(-1), reduction="sum"))
    assert value == pytest.approx(math.exp(want / (3 * 2 * 9)), rel=1e-9)
    assert fn.seq_len == 10 and fn.lower_is_better and fn.metric == "perplexity"
    assert fn.describe() == "perplexity@10 over 54 tokens (1 batch)"
    assert make_eval_fn([ids], "perplexity").seq_len == 20


def test_perplexity_errors():
    with pytest.raises(ValueError, match="seq_len is an option of metric 'perplexity'"):
        make_eval_fn([(torch.randn(2, 3), torch.tensor([0, 1]))], "accuracy", seq_len=8)
    with pytest.raises(ValueError, match="token ids of shape"):
        make_eval_fn([torch.randn(2, 5)], "perplexity")
    with pytest.raises(ValueError, match="seq_len must be an int >= 2"):
        make_eval_fn([torch.zeros(2, 5, dtype=torch.long)], "perplexity", seq_len=1)
    with pytest.raises(TypeError, match="next-token logits"):
        make_eval_fn([torch.zeros(2, 5, dtype=torch.long)], "perplexity")(nn.Identity())


@needs_hf
def test_perplexity_matches_hugging_face_loss_and_skips_padding():
    import transformers as T

    cfg = T.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)
    model = T.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = math.exp(float(model(input_ids=ids, labels=ids).loss))
    fn = make_eval_fn([{"input_ids": ids}], "perplexity")
    assert fn(model) == pytest.approx(want, rel=1e-5)
    assert fn.describe().startswith("perplexity@12 ")
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    padded = make_eval_fn([{"input_ids": ids, "attention_mask": mask}], "perplexity")
    padded(model)
    assert padded.tokens == 11 + 5
    labels = ids.clone()
    labels[0, :4] = -100
    assert make_eval_fn([({"input_ids": ids}, labels)], "perplexity")(model) != pytest.approx(want)


# ----- Hugging Face: compensation survives save_pretrained ----------------------------------
@needs_hf
def test_llama_compensation_reloads(tmp_path):
    import transformers as T

    from prunekit.integrations import hf

    cfg = T.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=48,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).eval()
    x = {"input_ids": torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1)), "use_cache": False}
    cal = [{"input_ids": torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(s))} for s in (2, 3)]
    res = prunekit.prune(
        model,
        x,
        removal_ratio=0.3,
        criterion="fluctuation",
        calibration=cal,
        compensate=True,
        excludes=["model.embed_tokens"],
        log=lambda m: None,
    )  # the hidden size stays
    assert any(k.endswith("down_proj.bias") for k in res.plan.meta["added_biases"])
    slim = prunekit.to_slim(model)
    assert_equivalent(run(model, x), run(slim, x), "compensated llama")
    hf.save_pretrained(slim, tmp_path / "m")
    again = hf.from_pretrained(T.LlamaForCausalLM, tmp_path / "m")
    assert prunekit.max_error(run(slim, x), run(again, x)) <= prunekit.TOLERANCE
    remote = T.AutoModelForCausalLM.from_pretrained(tmp_path / "m", trust_remote_code=True)
    assert prunekit.max_error(run(slim, x), run(remote, x)) <= prunekit.TOLERANCE


# ----- the CLI ------------------------------------------------------------------------------
def test_cli_one_shot_prune_with_compensation(tmp_path, capsys):
    import yaml

    from prunekit.cli.main import main
    from tinyjob import TinyNet, write_config

    cfg = write_config(tmp_path, criterion="fluctuation", prune={"compensate": True})
    assert main(["prune", "-c", str(cfg), "--removal-ratio", "0.4"]) == 2
    err = capsys.readouterr().err
    assert "criterion 'fluctuation' and prune.compensate read calibration batches" in err
    assert "--calibrate-batches" in err
    assert main(["prune", "-c", str(cfg), "--removal-ratio", "0.4", "--calibrate-batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "bias compensation" in out, out
    ws = tmp_path / "ws"
    plan = prunekit.PruningPlan.load(ws / "pruned" / "plan.json")
    assert plan.meta["added_biases"] and plan.meta["criterion"] == "fluctuation"
    model = prunekit.load_sparse(TinyNet(), ws / "pruned")  # the created biases come back
    x = torch.randn(2, 1, 8, 8)
    assert_equivalent(run(model, x), run(prunekit.to_slim(model), x), "CLI compensated TinyNet")
    assert yaml.safe_load((ws / "config.yaml").read_text())["prune"]["compensate"] is True


def test_cli_taylor_criterion_in_ana_prune_and_run(tmp_path, capsys):
    """criterion: taylor sums its gradients on the calibration batches in every verb; prune used to fail
    with "call Pruner.accumulate_gradients first"."""
    from prunekit.cli.main import main
    from tinyjob import trained, write_config

    ckpt = tmp_path / "trained.pt"
    torch.save(trained().state_dict(), ckpt)
    model = {"checkpoint": str(ckpt)}
    cfg = write_config(tmp_path, criterion="taylor", model=model)
    assert main(["prune", "-c", str(cfg), "--removal-ratio", "0.4"]) == 2
    err = capsys.readouterr().err
    assert "criterion 'taylor' read calibration batches" in err and "--calibrate-batches" in err, err
    cfg = write_config(tmp_path, criterion="taylor", model=model, prune={"calibrate_batches": 2})
    assert main(["ana", "-c", str(cfg), "--no-progress"]) == 0
    assert main(["prune", "-c", str(cfg), "--removal-ratio", "0.4"]) == 0, capsys.readouterr().err
    ws = tmp_path / "ws"
    assert prunekit.PruningPlan.load(ws / "pruned" / "plan.json").meta["criterion"] == "taylor"
    run_cfg = write_config(
        tmp_path, criterion="taylor", model=model, workspace=str(tmp_path / "run"), run={"calibrate_batches": 2}
    )
    assert main(["run", "-c", str(run_cfg)]) == 0, capsys.readouterr().err
    plans = [prunekit.PruningPlan.load(p) for p in sorted((tmp_path / "run" / "steps").glob("*/model/plan.json"))]
    assert plans and all(p.pruned and p.meta["criterion"] == "taylor" for p in plans), [p.meta for p in plans]
