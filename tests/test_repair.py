"""Neuron localisation and gradient-masked repair: a planted neuron is found, masked parameters stay bit-identical
under AdamW with weight decay, the repaired policy is a drop-in checkpoint, bad input is one line."""

from __future__ import annotations

import copy
import importlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, compose_config, tiny
from gymnasium import spaces
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from madistill.attacks.budget import Budget
from madistill.attacks.methods import Attack, training_attack
from madistill.distill.loss import DistillLoss
from madistill.envs.features import feature_layouts
from madistill.envs.groups import AgentGroup
from madistill.errors import MadistillError
from madistill.policies.base import greedy_actions
from madistill.policies.mlp import MLPPolicy
from madistill.policies.store import load_team, read_manifest
from madistill.repair.failures import Adversary, FailureSet, attack_failures, forced_failures
from madistill.repair.masked import (
    FinetuneSettings,
    fisher_mask,
    mask_size,
    masked_finetune,
    neuron_mask,
    parameter_delta,
    random_entries,
)
from madistill.repair.neurons import ablation_check, all_neurons, failure_loss, neuron_scores, repair_path
from madistill.repair.objectives import FixedFailures, RebuiltFailures
from madistill.repair.plan import (
    Choice,
    acting_mask,
    choose,
    choose_neurons,
    fixed_terms,
    forced_target_terms,
    holdout,
    rebuilt_terms,
    term_batches,
    tune,
    validation_scores,
)
from madistill.runtime import env_spec, make_vec_env
from madistill.stages import attack as attack_stage
from madistill.stages import cascade as cascade_stage
from madistill.stages import distill as distill_stage
from madistill.stages import evaluate as evaluate_stage
from madistill.stages import repair as repair_stage
from madistill.stages import train as train_stage

GROUP = AgentGroup("g", ("a_0",), spaces.Box(-np.inf, np.inf, (4,), np.float32), spaces.Discrete(3))
PLANTED = 5


def planted_policy() -> MLPPolicy:
    """16 hidden units; unit 5 alone reads feature 0 and alone drives the output towards action 0 (away from 1);
    the other units read features 1-3 and barely reach the output."""
    torch.manual_seed(0)
    p = MLPPolicy(GROUP, {"hidden_sizes": [16], "activation": "tanh"})
    with torch.no_grad():
        first, out = p.net[0], p.net[2]
        first.weight.normal_(0, 0.5)
        first.weight[:, 0] = 0.0
        first.weight[PLANTED] = torch.tensor([3.0, 0.0, 0.0, 0.0])
        first.bias.zero_()
        out.weight.normal_(0, 0.05)
        out.weight[:, PLANTED] = torch.tensor([4.0, -4.0, 0.0])
        out.bias.zero_()
    return p


def failing_and_clean():
    """Failing observations (feature 0 high: the planted unit pushes action 0, action 1 is wanted) and clean ones."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(400, 4, generator=gen)
    failing = x[:200].clone()
    failing[:, 0] = 1.0 + failing[:, 0].abs()
    clean = x[200:].clone()
    clean[:, 0] = -1.0 - clean[:, 0].abs()
    return failing, torch.ones(200, dtype=torch.long), clean


@pytest.mark.parametrize("method", ["grad", "ig", "probe"])
def test_localisation_finds_the_planted_neuron(method):
    p = planted_policy()
    layers = repair_path(p).hidden
    failing, wanted, clean = failing_and_clean()
    scores = neuron_scores(method, p, layers, failing, wanted, clean, ig_steps=16, probe_l1=1e-3, probe_steps=300, seed=0)
    assert scores.shape == (16,)
    assert int(scores.argmax()) == PLANTED
    others = torch.cat([scores[:PLANTED], scores[PLANTED + 1:]])
    assert float(scores[PLANTED]) > 3 * float(others.max())
    assert choose_neurons(layers, scores, 1 / 16, 10_000) == [(0, PLANTED)]


def test_ablating_the_planted_neuron_changes_the_failing_actions_more_than_random_ones():
    p = planted_policy()
    layers = repair_path(p).hidden
    failing, _, _ = failing_and_clean()
    check = ablation_check(p, layers, [(0, PLANTED)], failing, draws=15, seed=0)
    assert check["top"] > 0.5  # the failing action was the planted unit's doing
    assert check["random_mean"] < check["top"] / 2
    # one of the 16 random single units is the planted one: about 1/16 of the draws match it
    assert check["random_at_least_top"] < 0.3


def test_the_fisher_mask_frees_the_entries_with_the_largest_squared_gradients_among_the_candidates():
    """A zero linear layer (every action 1/3 likely, action 1 wanted) whose failing inputs are 0 but on feature 2
    (value 5): only column 2 of the weight and the bias have gradients, the column's 25 times larger in square, so
    the top 3 are the column, and with its first entry no candidate the next is the bias entry of largest
    gradient (action 1's); an entry that is no candidate is never chosen."""
    layer = torch.nn.Linear(4, 3)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    x = torch.zeros(64, 4)
    x[:, 2] = 5.0
    wanted = torch.ones(64, dtype=torch.long)

    def losses():
        for i in range(0, 64, 16):
            yield torch.nn.functional.cross_entropy(layer(x[i:i + 16]), wanted[i:i + 16])

    everything = {n: torch.ones_like(t, dtype=torch.bool) for n, t in layer.named_parameters()}
    top = fisher_mask(layer, everything, losses(), 3)
    assert top["weight"].nonzero().tolist() == [[0, 2], [1, 2], [2, 2]] and not top["bias"].any()
    no_first = {**everything, "weight": everything["weight"].clone()}
    no_first["weight"][0, 2] = False
    top = fisher_mask(layer, no_first, losses(), 3)
    assert top["weight"].nonzero().tolist() == [[1, 2], [2, 2]] and top["bias"].tolist() == [False, True, False]
    # never beyond the candidates, nor an entry the loss does not move: 2 weights of column 2 and the 3 biases
    everything_moving = fisher_mask(layer, no_first, losses(), 1000)
    assert mask_size(everything_moving) == 5 and not everything_moving["weight"][:, [0, 1, 3]].any()


def test_the_fisher_mask_finds_the_planted_path_and_its_random_baseline_has_its_size():
    p = planted_policy()
    failing, wanted, clean = failing_and_clean()
    failures = FailureSet(failing, wanted, "planted")
    acting = acting_mask(p)
    mask = fisher_mask(p, acting, term_batches(FixedFailures(failures), p, 64, 4, seed=0), 6)
    assert mask_size(mask) == 6
    # the planted unit drives the failing action through its output weights to actions 0 and 1
    assert {(0, PLANTED), (1, PLANTED)} <= {tuple(e) for e in mask["net.2.weight"].nonzero().tolist()}
    random = random_entries(acting, 6, seed=1)
    assert mask_size(random) == 6 and all(bool((random[n] <= acting[n]).all()) for n in acting)
    assert all(torch.equal(random_entries(acting, 6, seed=1)[n], random[n]) for n in acting)
    assert any(not torch.equal(random_entries(acting, 6, seed=2)[n], random[n]) for n in acting)
    # the entries are where the failure loss falls: a fine-tune of them fits the failures better than of random ones
    s = FinetuneSettings(steps=20, batch_size=64, learning_rate=0.05, weight_decay=0.0, anchor=1.0, divergence="kl")
    tuned = {name: masked_finetune(p, m, FixedFailures(failures), clean, s, seed=0) for name, m in (("fisher", mask),
                                                                                                  ("random", random))}
    with torch.no_grad():
        fitted = {name: float(failure_loss(q, failing, wanted).mean()) for name, q in tuned.items()}
        before = float(failure_loss(p, failing, wanted).mean())
    assert fitted["fisher"] < 0.6 * fitted["random"] and fitted["random"] < before


def adversary(every: int = 1, eps: float = 0.3) -> Adversary:
    """Adversarial repair on the 4-feature group: ce PGD to rebuild failures, the suite's kl PGD to judge."""
    return Adversary(every, training_attack("ce", 10), Attack("pgd", "kl", 10, 3), Budget.build(eps, 4))


@pytest.mark.parametrize("adv", [None, adversary()], ids=["fixed", "adversarial"])
def test_masked_parameters_stay_bit_identical_under_adamw_with_weight_decay(adv):
    torch.manual_seed(0)
    p = MLPPolicy(GROUP, {"hidden_sizes": [16, 16], "activation": "tanh"})
    layers = repair_path(p).hidden
    failing, wanted, clean = failing_and_clean()
    chosen = [(0, 3), (1, 7), (1, 8)]
    mask = neuron_mask(layers, chosen)
    assert mask_size(mask) == (4 + 1) + 2 * (16 + 1)
    # every step also moves the anchor's gradient through the other parameters, weight decay pulls on them all
    s = FinetuneSettings(steps=30, batch_size=64, learning_rate=0.05, weight_decay=0.5, anchor=1.0, divergence="kl")
    term = FixedFailures(FailureSet(failing, wanted, "test")) if adv is None else \
        RebuiltFailures(adv, clean, greedy_actions(p, clean))
    tuned = masked_finetune(p, mask, term, clean, s, seed=0)
    before, after = dict(p.named_parameters()), dict(tuned.named_parameters())
    for name, w in before.items():
        m = mask.get(name, torch.zeros_like(w, dtype=torch.bool))
        assert torch.equal(after[name][~m], w[~m]), name  # bit for bit
        assert bool((after[name][m] != w[m]).all()), name  # every free entry moved
    delta = parameter_delta(p, tuned)
    assert sorted(delta) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]
    assert sum(len(d[0]) for d in delta.values()) == mask_size(mask)
    idx, val, change = delta["net.2.weight"]
    rebuilt = before["net.2.weight"].detach().flatten().clone()
    torch.testing.assert_close(rebuilt[idx] + change, val)
    rebuilt[idx] = val
    assert torch.equal(rebuilt.view_as(after["net.2.weight"]), after["net.2.weight"].detach())
    with torch.no_grad():
        failing_loss = [-torch.log_softmax(q(failing), -1)[:, 1].mean() for q in (p, tuned)]
    assert float(failing_loss[1]) < float(failing_loss[0])


def sharp_policy() -> MLPPolicy:
    """Random tanh MLP with weights x3: sharp decision boundaries, so small moves of the input flip actions."""
    torch.manual_seed(0)
    p = MLPPolicy(GROUP, {"hidden_sizes": [32, 32], "activation": "tanh"})
    with torch.no_grad():
        for m in p.net:
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(3.0)
    return p


def test_regenerated_failures_are_the_current_policys_and_a_robust_policy_has_none():
    p = sharp_policy()
    clean = torch.randn(300, 4, generator=torch.Generator().manual_seed(1))
    wanted = greedy_actions(p, clean)
    adv = adversary()
    initial = adv.failures(p, clean, wanted, torch.Generator().manual_seed(0))
    assert 0 < len(initial) < len(clean) and initial.searched == len(clean)
    assert bool((greedy_actions(p, initial.x) != initial.wanted).all())
    assert bool(((initial.x - clean[:, None]).abs().amax(-1) <= 0.3 + 1e-6).any(0).all())  # each inside the ball
    # after an adversarial fine-tune the attack on the tuned policy finds other failures, each a failure of it
    full = {n: torch.ones_like(w, dtype=torch.bool) for n, w in p.named_parameters()}
    s = FinetuneSettings(steps=20, batch_size=64, learning_rate=0.01, weight_decay=0.0, anchor=1.0, divergence="kl")
    tuned = masked_finetune(p, full, RebuiltFailures(adv, clean, wanted), clean, s, seed=0)
    now = adv.failures(tuned, clean, wanted, torch.Generator().manual_seed(0))
    assert bool((greedy_actions(tuned, now.x) != now.wanted).all())
    assert len(now) < len(initial)
    assert not torch.equal(now.x[: len(now)], initial.x[: len(now)])
    # a policy whose action does not depend on its input resists every perturbation: no failure to rebuild
    constant = copy.deepcopy(p)
    with torch.no_grad():
        constant.net[0].weight.zero_()
    none = adv.failures(constant, clean, greedy_actions(constant, clean), torch.Generator().manual_seed(0))
    assert len(none) == 0 and none.x.shape == (0, 4)
    # with no failure and no anchor nothing is fitted: the fine-tune returns the policy unchanged
    still = masked_finetune(constant, full, RebuiltFailures(adv, clean, greedy_actions(constant, clean)), clean,
                            replace(s, anchor=0.0), 0)
    assert all(torch.equal(a, b) for a, b in zip(constant.parameters(), still.parameters()))


def test_adversarial_repair_raises_robust_accuracy_where_the_fixed_failure_set_does_not():
    """The fixed set is the original's pgd failures; fitting them (it fits more of the held-out ones) leaves the
    held-out robust accuracy under a fresh pgd on the tuned policy where it was, rebuilding them against the
    policy being tuned raises it. Same steps, rate, anchor and seed."""
    p = sharp_policy()
    clean = torch.randn(600, 4, generator=torch.Generator().manual_seed(1))
    adv = adversary()
    split = holdout(attack_failures(p, clean, adv.check, adv.budget, 0, "pgd", 10_000), clean, 0.25, seed=0)
    full = {n: torch.ones_like(w, dtype=torch.bool) for n, w in p.named_parameters()}
    s = FinetuneSettings(steps=100, batch_size=64, learning_rate=0.01, weight_decay=0.0, anchor=1.0, divergence="kl")
    terms = {"fixed": fixed_terms(split), "adversarial": rebuilt_terms(adv, p)(split)}
    tuned = {name: masked_finetune(p, full, t.train, split.train_clean, s, 0) for name, t in terms.items()}
    robust = {name: validation_scores(p, q, terms["adversarial"].val, split.val_clean, "kl", 0)["accuracy"]
              for name, q in {"original": p, **tuned}.items()}
    fitted = {name: validation_scores(p, q, terms["fixed"].val, split.val_clean, "kl")["accuracy"]
              for name, q in tuned.items()}
    assert robust["adversarial"] > robust["original"] + 0.15
    assert robust["adversarial"] > robust["fixed"] + 0.15
    assert robust["fixed"] < robust["original"] + 0.05
    assert fitted["fixed"] > fitted["adversarial"]  # fitting the original's failures is not resisting the attack


def test_training_against_forced_targets_raises_the_share_that_resists_them():
    """The lookahead's term: states with a harmful target each (the action after the greedy one), forced on the
    policy by targeted PGD. The original takes many of them (they are its failures, forced_failures); fitting
    robust distillation's loss with the targets forced anew on the policy being tuned raises the held-out share
    that keeps the original's action with the target forced on it."""
    p = sharp_policy()
    states = torch.randn(800, 4, generator=torch.Generator().manual_seed(1))
    targets = (greedy_actions(p, states) + 1) % 3
    targets[::4] = -1  # states the lookahead forced nothing on: no target, no failure
    budget = Budget.build(0.3, 4)
    found = forced_failures(p, states, targets, 10, budget, 0, "lookahead", 10_000)
    assert found.searched == int((targets >= 0).sum()) and 0 < len(found) < found.searched
    assert bool((greedy_actions(p, found.x) != found.wanted).all())
    split = holdout(found, torch.randn(200, 4, generator=torch.Generator().manual_seed(2)), 0.25, seed=0)
    objective = DistillLoss(adv_weight=1.0, smooth_weight=0.5, adv_steps=10)
    layout = feature_layouts([GROUP], {}, {GROUP.name: [f"f{i}" for i in range(4)]}, 1)[GROUP.name]
    terms = forced_target_terms(p, states, targets, objective, layout, budget, 0.25, seed=0)(split)
    before = terms.val.accuracy(p, p, 0)
    assert before < 0.8  # the original takes many of its forced targets
    full = {n: torch.ones_like(w, dtype=torch.bool) for n, w in p.named_parameters()}
    s = FinetuneSettings(steps=150, batch_size=64, learning_rate=0.01, weight_decay=0.0, anchor=1.0, divergence="kl")
    tuned = masked_finetune(p, full, terms.train, split.train_clean, s, 0)
    # the same states fitted without the adversarial term (the clean head only) barely move it
    plain = forced_target_terms(p, states, targets, DistillLoss(adv_weight=0.0, adv_steps=10), layout, budget, 0.25,
                                seed=0)(split)
    control = masked_finetune(p, full, plain.train, split.train_clean, s, 0)
    assert terms.val.accuracy(p, tuned, 0) > max(before, terms.val.accuracy(p, control, 0)) + 0.07


def test_the_lookahead_terms_hold_out_targeted_states_even_when_targets_are_rare():
    p = sharp_policy()
    states = torch.randn(44, 4, generator=torch.Generator().manual_seed(1))
    targets = torch.full((44,), -1)
    targets[[3, 17, 29, 40]] = (greedy_actions(p, states[[3, 17, 29, 40]]) + 1) % 3
    layout = feature_layouts([GROUP], {}, {GROUP.name: [f"f{i}" for i in range(4)]}, 1)[GROUP.name]
    split = holdout(FailureSet(states[:2], torch.zeros(2, dtype=torch.long), "t"), torch.randn(8, 4), 0.25, 0)
    terms = forced_target_terms(p, states, targets, DistillLoss(), layout, Budget.build(0.3, 4), 0.25, seed=0)(split)
    val, train = terms.val.data, terms.train.data
    assert int((val.target >= 0).sum()) == 1 and len(val) == 1 + 10  # a quarter of each kind
    assert int((train.target >= 0).sum()) == 3 and len(train) == 3 + 30 + len(split.train_clean)
    one = torch.full((44,), -1)
    one[5] = 0
    with pytest.raises(MadistillError, match="forced a target in 1 states of the 'g' group, too few to hold some "
                                             "out: raise repair.episodes"):
        forced_target_terms(p, states, one, DistillLoss(), layout, Budget.build(0.3, 4), 0.25, seed=0)


def test_the_learning_rate_choice_avoids_a_rate_that_breaks_the_clean_behaviour():
    """Every parameter free and no anchor: the large rate fits the failures and wrecks the clean actions, which
    the held-out clean divergence sees; the bound makes the choice the small rate, accuracy alone would not."""
    p = planted_policy()
    failing, wanted, clean = failing_and_clean()
    split = holdout(FailureSet(failing, wanted, "test"), clean, 0.25, seed=0)
    assert (len(split.val), len(split.train), len(split.val_clean), len(split.train_clean)) == (50, 150, 50, 150)
    full = {n: torch.ones_like(w, dtype=torch.bool) for n, w in p.named_parameters()}
    s = FinetuneSettings(steps=40, batch_size=64, learning_rate=0.0, weight_decay=0.0, anchor=0.0, divergence="kl")
    tuned, choice = tune(p, full, fixed_terms(split), split, s, [0.003, 3.0], [0.0], bound=0.05, seed=0)
    small, large = choice.trials
    assert (small.learning_rate, large.learning_rate) == (0.003, 3.0)
    assert large.divergence > 0.05 >= small.divergence
    assert large.accuracy > small.accuracy  # accuracy alone would pick the rate that breaks the policy
    assert choice.chosen == small and choice.within_bound
    kept = float((greedy_actions(tuned, split.val_clean) == greedy_actions(p, split.val_clean)).float().mean())
    assert kept >= 0.95
    assert choose(choice.trials, bound=0.0) == Choice(small, choice.trials, False)  # none within: least divergence


def test_the_anchor_weight_not_the_rate_keeps_full_fine_tuning_within_the_bound():
    """Failures next to the clean observations (each a clean one moved by 0.5 in every feature, wanting its clean
    action), every parameter free: with the anchor at weight 1 no learning rate keeps the held-out clean
    divergence within the bound, so the choice falls back to a policy that breaks the bound; searching the anchor
    weight with the rate finds a fine-tune within it that still fits failures."""
    torch.manual_seed(0)
    p = MLPPolicy(GROUP, {"hidden_sizes": [32, 32], "activation": "tanh"})
    with torch.no_grad():
        for m in p.net:
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(3.0)  # sharp decision boundaries, so small moves flip actions
    gen = torch.Generator().manual_seed(1)
    clean = torch.randn(1000, 4, generator=gen)
    moved = clean + 0.5 * torch.sign(torch.randn(1000, 4, generator=gen))
    before, after = greedy_actions(p, clean), greedy_actions(p, moved)
    flipped = before != after
    split = holdout(FailureSet(moved[flipped], before[flipped], "test"), clean, 0.25, seed=0)
    full = {n: torch.ones_like(w, dtype=torch.bool) for n, w in p.named_parameters()}
    s = FinetuneSettings(steps=100, batch_size=64, learning_rate=0.0, weight_decay=0.0, anchor=0.0, divergence="kl")
    tuned, choice = tune(p, full, fixed_terms(split), split, s, [0.003, 0.03], [1.0, 30.0], bound=0.02, seed=0)
    weak = [t for t in choice.trials if t.anchor == 1.0]
    assert len(weak) == 2 and min(t.divergence for t in weak) > 0.02
    assert not choose(weak, bound=0.02).within_bound
    assert choice.within_bound and choice.chosen.anchor == 30.0 and choice.chosen.divergence <= 0.02
    assert choice.chosen.accuracy > 0.05  # it repairs part of the held-out failures
    kept = float((greedy_actions(tuned, split.val_clean) == greedy_actions(p, split.val_clean)).float().mean())
    assert kept >= 0.9


def test_holding_out_needs_two_observations_of_each():
    with pytest.raises(MadistillError, match="raise repair.episodes or repair.eps"):
        holdout(FailureSet(torch.zeros(1, 4), torch.zeros(1, dtype=torch.long), "test"), torch.zeros(5, 4), 0.25, 0)


def test_plain_adamw_without_the_guard_would_move_zero_gradient_parameters():
    """Why masked_finetune restores the masked-out entries: with their gradient zeroed, AdamW still decays them."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1, weight_decay=0.5)
    w.grad = torch.tensor([1.0, 0.0, 0.0])
    opt.step()
    assert bool((w.detach()[1:] != 1.0).all())


RELAY = ("env=relay", "teacher.total_agent_steps=3000", "seed=0")
REPAIR = ("attack=quick", "attack.episodes=3", "attack.eps=[1.0]", "repair.episodes=4", "repair.steps=20",
          "repair.batch_size=32", "repair.ablation_draws=4", "repair.neurons=0.25",
          "repair.learning_rates=[0.001,0.01]", "repair.anchors=[1,10]")


@pytest.fixture(scope="module")
def relay_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("relay") / "teacher"
    train_stage.run(compose_config(tiny(*RELAY)), path)
    return path


@pytest.fixture(scope="module")
def repaired(relay_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("repair") / "run"
    payload = repair_stage.run(compose_config(tiny("env=relay", f"repair.policy={relay_teacher}", *REPAIR)), out)
    return out, payload


def test_the_repaired_teacher_is_a_drop_in_checkpoint_with_its_update(relay_teacher, repaired, tmp_path):
    out, payload = repaired
    pdir = out / "policies" / "teacher"
    team, manifest = load_team(pdir)
    original, _ = load_team(relay_teacher)
    assert manifest["role"] == "teacher" and manifest["config"]["repair"]["group"] == payload["meta"]["group"]
    g = payload["meta"]["group"]
    masked = payload["variants"]["masked"]
    assert masked["changed"] == masked["mask_size"] > 0
    assert masked["changed_share"] <= 0.05 + 1e-9 or len(payload["neurons"]) == 1
    # the update: writing delta.safetensors' values into the original gives the repaired weights, bit for bit
    delta = load_file(str(pdir / "delta.safetensors"))
    orig, new = dict(original[g].named_parameters()), dict(team[g].named_parameters())
    changed = 0
    for name, p in orig.items():
        flat = p.detach().flatten().clone()
        if f"{g}/{name}.index" in delta:
            idx = delta[f"{g}/{name}.index"]
            flat[idx] = delta[f"{g}/{name}.value"]
            changed += len(idx)
        assert torch.equal(flat.view_as(p), new[name].detach()), name
    assert changed == masked["changed"]
    report = json.loads((out / "reports" / "repair.json").read_text())
    assert set(report["variants"]) == {"masked", "full", "last", "random"}
    assert report["variants"]["random"]["mask_size"] == masked["mask_size"]
    assert report["variants"]["full"]["changed"] > masked["changed"]
    # full fine-tuning frees every acting parameter of the SB3 teacher and none of its critic
    assert report["variants"]["full"]["mask_size"] == report["meta"]["acting_parameters"]
    for ev in [report["original"]["evaluation"], *(v["evaluation"] for v in report["variants"].values())]:
        assert len(ev["worst_episodes"]) == 3 and ev["worst"] == pytest.approx(np.mean(ev["worst_episodes"]))
    # each variant's learning rate and anchor weight are chosen from the grid on the held-out split, and the
    # report shows every trial
    for v in report["variants"].values():
        assert [(t["learning_rate"], t["anchor"]) for t in v["validation"]] == [(0.001, 1), (0.001, 10), (0.01, 1),
                                                                                (0.01, 10)]
        chosen = next(t for t in v["validation"] if (t["learning_rate"], t["anchor"]) == (v["learning_rate"], v["anchor"]))
        assert 0 <= chosen["accuracy"] <= 1
    md = (out / "reports" / "repair.md").read_text()
    assert md.startswith("# Repair of") and "| learning rate | anchor |" in md
    # TensorBoard: the report as text, each variant's share of changed parameters and returns
    ea = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    scalars = {t: ea.Scalars(t)[0].value for t in ea.Tags()["scalars"]}
    assert scalars["repair/masked/changed_share"] == pytest.approx(masked["changed_share"])
    assert scalars["repair/original/worst_return"] == pytest.approx(report["original"]["evaluation"]["worst"])
    assert scalars["repair/full/clean_return"] == pytest.approx(report["variants"]["full"]["evaluation"]["clean"])
    assert "repair/report/text_summary" in ea.Tags()["tensors"]
    # every stage that loads policies takes it: evaluate, attack, and distill (as the teacher)
    evaluate_stage.run(compose_config(tiny("env=relay", f"eval.policy={out}")), tmp_path / "eval")
    assert json.loads((tmp_path / "eval" / "reports" / "eval_teacher.json").read_text())
    attack_stage.run(compose_config(tiny("env=relay", f"attack.policy={out}", "attack=quick", "attack.episodes=2")),
                     tmp_path / "attack")
    assert (tmp_path / "attack" / "reports" / "robustness.json").exists()
    distill_stage.run(compose_config(tiny("env=relay", f"distill.teacher={pdir}")), tmp_path / "distill")
    assert read_manifest(tmp_path / "distill" / "policies" / "student")["role"] == "student"


def test_the_stage_repairs_adversarially_and_judges_robust_accuracy(relay_teacher, tmp_path):
    """repair.refresh > 0: every variant is fine-tuned against failures rebuilt on itself, the held-out accuracy
    is under a fresh attack (so the original's own held-out failures are not what it counts) and the parameters
    outside the mask stay bit-identical."""
    cfg = compose_config(tiny("env=relay", f"repair.policy={relay_teacher}", *REPAIR, "repair.refresh=5",
                              "repair.adv_steps=3", "repair.evaluate=false", "repair.baselines=[random]"))
    payload = repair_stage.run(cfg, tmp_path / "run")
    assert payload["meta"]["repair"]["refresh"] == 5
    g = payload["meta"]["group"]
    masked = payload["variants"]["masked"]
    assert 0 < masked["changed"] <= masked["mask_size"]
    free = {(n["layer"], n["unit"]) for n in payload["neurons"]}
    after = dict(load_team(tmp_path / "run")[0][g].named_parameters())
    for name, w in load_team(relay_teacher)[0][g].named_parameters():
        layer, kind = name.rsplit(".", 1)
        rows = [u for lay, u in free if lay == layer and kind in ("weight", "bias")]
        keep = torch.ones(len(w), dtype=torch.bool)
        keep[rows] = False
        assert torch.equal(after[name][keep], w[keep]), name  # bit for bit outside the chosen neurons' rows
    md = (tmp_path / "run" / "reports" / "repair.md").read_text()
    assert "Adversarial repair: the failures rebuilt every 5 steps by ce PGD" in md
    assert "| held-out accuracy under a fresh attack |" in md


def test_the_stage_repairs_with_the_fisher_mask(relay_teacher, tmp_path):
    """repair.mask=fisher: the masked repair frees the max_parameters share of the acting parameters (whatever
    neurons they belong to), the random baseline as many random ones, and only freed entries change."""
    cfg = compose_config(tiny("env=relay", f"repair.policy={relay_teacher}", *REPAIR, "repair.mask=fisher",
                              "repair.fisher_batches=4", "repair.evaluate=false", "repair.baselines=[random]"))
    payload = repair_stage.run(cfg, tmp_path / "run")
    acting = payload["meta"]["acting_parameters"]
    masked, random = payload["variants"]["masked"], payload["variants"]["random"]
    assert masked["mask_size"] == random["mask_size"] == int(0.05 * acting)
    assert 0 < masked["changed"] <= masked["mask_size"]
    g = payload["meta"]["group"]
    original = dict(load_team(relay_teacher)[0][g].named_parameters())
    after = dict(load_team(tmp_path / "run")[0][g].named_parameters())
    changed = {n for n, w in original.items() if bool((after[n] != w).any())}
    assert sum(int((after[n] != original[n]).sum()) for n in changed) == masked["changed"]
    assert changed and changed <= set(acting_mask(load_team(relay_teacher)[0][g]))  # the critic stays as it was
    assert {n: int((after[n] != original[n]).sum()) for n in changed} == masked["changed_by_parameter"]
    md = (tmp_path / "run" / "reports" / "repair.md").read_text()
    assert "largest empirical Fisher information" in md


def test_the_stage_repairs_against_the_lookahead(relay_teacher, tmp_path):
    """repair.attack=targeted_lookahead: episodes under the lookahead give the failures (its forced targets the
    original takes), every variant is fine-tuned on its states with the targets forced anew, and each trial is
    judged by the held-out states' share that keeps the original's action under its target."""
    cfg = compose_config(tiny("env=relay", f"repair.policy={relay_teacher}", *REPAIR, "repair.attack=targeted_lookahead",
                              "repair.adv_steps=2", "repair.mask=fisher", "repair.fisher_batches=2",
                              "repair.evaluate=false", "repair.baselines=[random]", "attack.lookahead_horizon=2"))
    payload = repair_stage.run(cfg, tmp_path / "run")
    meta = payload["meta"]
    assert meta["failure_source"] == "targeted_lookahead at eps 1.0"
    assert 0 < meta["failures"] <= meta["searched"]
    masked = payload["variants"]["masked"]
    assert 0 < masked["changed"] <= masked["mask_size"] == int(0.05 * meta["acting_parameters"])
    accuracies = [t["accuracy"] for v in payload["variants"].values() for t in v["validation"]]
    assert len(accuracies) == 2 * 4 and all(0 <= a <= 1 for a in accuracies)
    assert load_team(tmp_path / "run")[1]["config"]["repair"]["attack"] == "targeted_lookahead"
    md = (tmp_path / "run" / "reports" / "repair.md").read_text()
    assert "the lookahead's targets forced anew" in md and "| held-out share keeping its action under the forced" in md


def test_the_lookahead_states_line_up_with_the_targets_forced_on_them(relay_teacher):
    """Each recorded target is the harmful action the lookahead forced on that state's agent: never the original's
    greedy action on the clean state (a target recorded against a perturbed observation, or a row shifted, would
    show as targets equal to the clean action)."""
    cfg = compose_config(tiny("env=relay", f"repair.policy={relay_teacher}", *REPAIR, "repair.attack=targeted_lookahead",
                              "repair.adv_steps=2", "repair.episodes=2"))
    spec = env_spec(cfg.env)
    with make_vec_env(cfg.env, spec) as venv:
        team, _ = load_team(relay_teacher, venv.groups)
        layouts = feature_layouts(venv.groups, {}, venv.feature_names, 1)
        states, targets = repair_stage._lookahead_states(cfg, venv, team, spec, layouts, 1.0, None)
    for g in team.groups:
        rows = (targets[g.name] >= 0).nonzero().flatten()
        assert len(states[g.name]) == len(targets[g.name]) and len(rows) > 0
        clean = greedy_actions(team[g.name], states[g.name][rows])  # the states come normalised
        assert not bool((clean == targets[g.name][rows]).any())


def _error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("madistill repair: error: ")
    return lines[0]


CASCADE = ("cascade.episodes=4", "cascade.n_boot=50", "cascade.replay_episodes=1", "cascade.lags=2",
           "cascade.onsets=[2]", "fault.onset=2")


def test_the_cascade_comparison_runs_on_the_original_and_the_repaired_policy(relay_teacher, repaired, monkeypatch):
    """experiments/repair.py --cascade: the monitor studies both policies on the same faulted episodes and reports
    both; the original's numbers are those of the monitor run on the original alone."""
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    experiment = importlib.import_module("repair")
    out, payload = repaired
    source = Path(payload["meta"]["policy"])
    overrides = tiny(*CASCADE)
    res = experiment.cascade_comparison("relay", source, out, payload, None, 0, overrides)
    group = next(g for g in load_team(source)[0].groups if g.name == payload["meta"]["group"])
    assert res["victim"] == group.agents[0]
    others = sum(len(g.agents) for g in load_team(source)[0].groups) - 1
    for name in ("original", "repaired"):
        c = res[name]
        assert 0 <= c["size_mean"] <= others
        assert c["size_ci"][0] <= c["size_mean"] <= c["size_ci"][1]
        assert c["others_return_delta_ci"][0] <= c["others_return_delta"] <= c["others_return_delta_ci"][1]
    alone = cascade_stage.run(compose_config(["env=relay", "logger=quiet", f"cascade.policy={source}", "fault=attack",
                                              f"fault.method={payload['meta']['repair']['attack']}",
                                              f"fault.eps={payload['meta']['eps']}", f"fault.victims=[{res['victim']}]",
                                              "seed=0", *overrides]), out / "alone")
    single = next(iter(alone["faults"].values()))["cascade"]
    assert (single["size_mean"], single["others_return_delta"]) == (res["original"]["size_mean"],
                                                                    res["original"]["others_return_delta"])
    summary = experiment.summarise({0: {**payload, "cascade": res}})
    assert summary["cascade"]["repaired"]["size_mean"] == res["repaired"]["size_mean"]
    md = experiment.markdown(summary, "relay", "test")
    assert f"on {res['victim']}" in md and "| original |" in md and "| repaired |" in md


@pytest.mark.parametrize("extra, says", [
    (("repair.score=saliency",), "repair.score cannot be 'saliency': use repair.score=<one of grad, ig, probe>"),
    (("repair.attack=critic",), "repair.attack cannot be 'critic': use repair.attack=<one of random, fgsm, pgd, pgd_strong"),
    (("repair.baselines=[full,everything]",), "repair.baselines cannot be 'everything': use repair.baselines=[<any of full, last, random>]"),
    (("repair.neurons=3",), "repair.neurons must be in (0, 1], got 3.0"),
    (("repair.mask=rows",), "repair.mask cannot be 'rows': use repair.mask=<one of neurons, fisher>"),
    (("repair.fisher_batches=0",), "repair.fisher_batches must be at least 1, got 0"),
    (("repair.validation=1",), "repair.validation must be in (0, 1), got 1.0"),
    (("repair.anchors=[10,-1]",), "repair.anchors must be a non-empty list of weights at least 0, got [10.0, -1.0]"),
    (("repair.group=speaker",), "repair.group='speaker' is not a group of this env"),
    (("repair.failures=MISSING_NPZ",), "is not a readable .npz"),
    (("repair.failures=BAD_NPZ",), "lacks ['actions']"),
    (("repair.failures=WRONG_NPZ",), "actions must be"),
    (("repair.failures=WRONG_NPZ", "repair.refresh=1"), "repair.refresh rebuilds the failures by attacking the clean "
     "observations, so it cannot repair a repair.failures file: set repair.refresh=0 or drop repair.failures"),
    (("repair.refresh=-1",), "repair.refresh must be at least 0, got -1"),
    (("repair.attack=targeted_lookahead", "repair.refresh=1"), "repair.refresh must be 0 with "
     "repair.attack=targeted_lookahead, which forces the lookahead's targets anew"),
    (("repair.failures=WRONG_NPZ", "repair.attack=targeted_lookahead"), "repair.failures must be null with "
     "repair.attack=targeted_lookahead"),
    (("repair.attack=targeted_lookahead", "attack.lookahead_critic=true"), "repair.attack=targeted_lookahead plays "
     "the lookahead without a critic (the repair loads no value head): set attack.lookahead_critic=false"),
    (("repair.attack=targeted_lookahead", "attack.eps=[0]"), "repair.attack=targeted_lookahead at eps 0.0 perturbs "
     "nothing: set repair.eps > 0"),
    (("repair.adv_objective=pgd",), "repair.adv_objective cannot be 'pgd'"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(relay_teacher, cli, tmp_path, extra, says):
    np.savez(tmp_path / "bad.npz", obs=np.zeros((4, 3), np.float32))
    dims = load_team(relay_teacher)[0].groups[0]
    np.savez(tmp_path / "wrong.npz", obs=np.zeros((4, dims.obs_dim), np.float32), actions=np.full(4, 99))
    names = {"MISSING_NPZ": tmp_path / "none.npz", "BAD_NPZ": tmp_path / "bad.npz", "WRONG_NPZ": tmp_path / "wrong.npz"}
    extra = tuple(e.split("=")[0] + "=" + str(names.get(e.split("=")[1], e.split("=")[1])) for e in extra)
    if "repair.failures" in extra[0]:
        extra = (*extra, f"repair.group={dims.name}")
    out = tmp_path / "out"
    rc, _, err = cli("repair", "env=relay", f"repair.policy={relay_teacher}", *REPAIR, *extra,
                     f"hydra.run.dir={out}", "logger=quiet")
    assert rc == 2
    assert says in _error(err)
    assert not (out / "policies").exists() and not (out / "reports").exists()


def test_no_policy_given_is_one_line(cli, tmp_path):
    rc, _, err = cli("repair", f"hydra.run.dir={tmp_path / 'out'}", "logger=quiet")
    assert rc == 2 and "repair.policy=" in _error(err)


def test_all_neurons_and_choice_respect_the_parameter_cap():
    p = MLPPolicy(GROUP, {"hidden_sizes": [16, 16], "activation": "tanh"})
    layers = repair_path(p).hidden
    assert len(all_neurons(layers)) == 32
    scores = torch.arange(32, dtype=torch.float32)  # layer 1's units score highest
    assert choose_neurons(layers, scores, 0.25, 10_000) == [(1, u) for u in range(15, 7, -1)]
    assert choose_neurons(layers, scores, 0.25, 3 * 17) == [(1, 15), (1, 14), (1, 13)]


def _run(worst: dict[str, list[float]], clean: dict[str, list[float]]) -> dict:
    """A repair report with the given per-episode worst and clean returns per variant (random return 0)."""
    def ev(name: str) -> dict:
        return {"clean": float(np.mean(clean[name])), "worst": float(np.mean(worst[name])), "random": 0.0,
                "worst_attack": "pgd on all", "clean_episodes": clean[name], "worst_episodes": worst[name]}

    return {"original": {"evaluation": ev("original")}, "ablation": {},
            "variants": {n: {"evaluation": ev(n), "learning_rate": 0.01, "anchor": 10.0, "within_divergence_bound": True,
                             "changed": 5, "changed_share": 0.05} for n in worst if n != "original"}}


def test_the_experiment_summary_gives_the_masked_share_of_full_recovery_and_the_clean_gain_kept(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    experiment = importlib.import_module("repair")
    runs = {0: _run({"original": [0.0, -2.0], "masked": [3.0, 1.0], "full": [4.0, 2.0]},
                    {"original": [10.0, 10.0], "masked": [9.9, 9.9], "full": [9.0, 9.0]}),
            1: _run({"original": [-1.0, -1.0], "masked": [2.0, 2.0], "full": [3.0, 3.0]},
                    {"original": [20.0, 20.0], "masked": [19.8, 19.8], "full": [20.0, 20.0]})}
    summary = experiment.summarise(runs)
    # masked recovers 3 per episode where full recovers 4: a share of 0.75 in every resample
    assert summary["masked_recovery_of_full"] == {"mean": 0.75, "ci95": [pytest.approx(0.75), pytest.approx(0.75)]}
    assert summary["paired_worst_masked_minus"]["full"]["mean"] == -1.0
    kept = summary["clean_gain_kept_ci95"]
    assert kept["masked"] == [pytest.approx(0.99), pytest.approx(0.99)]  # 99% of the gain over random in both seeds
    # pooled over the seeds' episodes, every resample keeps each seed's two: (9 + 9 + 20 + 20) / (10 + 10 + 20 + 20)
    assert kept["full"] == [pytest.approx(58 / 60), pytest.approx(58 / 60)]
    assert summary["variants"]["full"]["clean_gain_kept"] == pytest.approx(58 / 60)
    assert summary["variants"]["masked"]["anchors"] == [10.0, 10.0]
    monkeypatch.setattr(experiment, "RESULTS", tmp_path)
    text = experiment.write_results(runs, "toy", "toy_eps0.2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repair_toy_eps0.2.json", "repair_toy_eps0.2.md"]
    assert "Masked recovery / full recovery of the worst case: 0.750 [0.750, 0.750]" in text
    assert "| masked | 0.01 @ 10, 0.01 @ 10 |" in text and "not a share of a recovery" not in text


def test_the_comparison_pairs_two_experiments_by_episode_and_refuses_different_episodes(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    compare = importlib.import_module("repair_compare").compare
    original = {"original": [-2.0, -4.0]}, {"original": [10.0, 10.0]}
    fixed = {"0": _run({**original[0], "masked": [-3.0, -5.0]}, {**original[1], "masked": [9.0, 9.0]})}
    adv = {"0": _run({**original[0], "masked": [-1.0, -2.0]}, {**original[1], "masked": [9.0, 10.0]})}
    res = compare({"runs": fixed}, {"runs": adv})
    assert res["seeds"] == [0]
    assert res["variants"]["masked"]["worst"]["mean"] == pytest.approx(2.5)  # (2 + 3) / 2, adversarial minus fixed
    assert res["variants"]["masked"]["clean"]["mean"] == pytest.approx(0.5)
    lo, hi = res["variants"]["masked"]["worst"]["ci95"]
    assert 2.0 <= lo <= hi <= 3.0
    other = {"0": _run({"original": [-2.0, -5.0], "masked": [0.0, 0.0]}, {**original[1], "masked": [9.0, 9.0]})}
    with pytest.raises(SystemExit, match="did not play the same episodes"):
        compare({"runs": fixed}, {"runs": other})


def test_the_lookahead_experiment_summarises_recovery_shares_and_clean_gain_with_paired_cis(monkeypatch, tmp_path):
    """experiments/repair_lookahead.py: per variant the recovery of the worst case and the clean gain over the
    random team kept, and per mask its difference from its random baseline and its share of full's recovery."""
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    experiment = importlib.import_module("repair_lookahead")
    worst = {"original": [-10.0, -12.0], "full": [-6.0, -8.0], "masked": [-11.0, -13.0], "random": [-10.0, -12.0],
             "fisher": [-7.0, -9.0], "random_fisher": [-10.0, -11.0]}
    clean = {v: [-5.0, -5.0] for v in worst} | {"fisher": [-6.0, -6.0]}

    def run() -> dict:
        return {"env": "toy", "group": "g", "eps": 0.3, "random_team": -25.0,
                "variants": {v: {"share": 0.05, "clean_episodes": clean[v], "worst_episodes": worst[v]} for v in worst}}

    s = experiment.summary([run(), run()])
    assert s["full"]["recovery"][0] == 4.0 and s["masked"]["recovery"][0] == -1.0
    assert s["fisher"]["share_of_full"] == [0.75, pytest.approx(0.75), pytest.approx(0.75)]  # 3 of 4 in every episode
    assert s["fisher"]["minus_random"][0] == pytest.approx(2.5)  # (3 + 2) / 2
    lo, hi = s["fisher"]["minus_random"][1:]
    assert 2.0 <= lo < hi <= 3.0
    assert s["fisher"]["clean_gain_kept"][0] == pytest.approx(19 / 20)  # (-6 + 25) / (-5 + 25)
    assert s["masked"]["share_of_full"][0] == pytest.approx(-0.25)
    monkeypatch.setattr(experiment, "RESULTS", tmp_path)
    text = experiment.write_results([run(), run()], "python x", "_toy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repair_lookahead_toy_toy.json", "repair_lookahead_toy_toy.md"]
    assert "fisher's recovery as a share of full's: 0.75 [0.75, 0.75]" in text
    assert "| fisher | 5.00% | -6.00 | 0.950 [0.950, 0.950] | -8.00 | +3.00 [+3.00, +3.00] |" in text


def test_a_sweep_of_runs_is_refused_as_one_repair_edits_one_policy(relay_teacher, cli, tmp_path):
    import shutil

    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        shutil.copytree(relay_teacher, sweep / job)
    rc, _, err = cli("repair", "env=relay", f"repair.policy={sweep}", *REPAIR, f"hydra.run.dir={tmp_path / 'out'}",
                     "logger=quiet")
    assert rc == 2
    assert f"holds the policies of 2 runs (a sweep): a repair edits one policy, so pass one run, e.g. repair.policy={sweep / '0'}" in _error(err)
    assert not (tmp_path / "out").exists()


def test_a_failures_file_of_the_wrong_shape_is_refused_before_any_episode(relay_teacher, cli, tmp_path, monkeypatch):
    from madistill.common import collect

    monkeypatch.setattr(collect, "collect_round", lambda *a, **k: pytest.fail("episodes played before the check"))
    group = load_team(relay_teacher)[0].groups[0]
    np.savez(tmp_path / "bad.npz", obs=np.zeros((4, group.obs_dim + 1), np.float32), actions=np.zeros(4, np.int64))
    group = group.name
    rc, _, err = cli("repair", "env=relay", f"repair.policy={relay_teacher}", *REPAIR, f"repair.failures={tmp_path / 'bad.npz'}",
                     f"repair.group={group}", f"hydra.run.dir={tmp_path / 'out'}", "logger=quiet")
    assert rc == 2 and "obs has shape (4, " in _error(err) and "needs [N > 0, " in _error(err)


def test_the_terminal_says_what_the_repair_did_and_warns_where_it_made_things_worse():
    from madistill.stages.repair import _outcome

    def payload(clean: float, worst: float) -> dict:
        return {"original": {"evaluation": {"clean": -10.0, "worst": -20.0}},
                "variants": {"masked": {"evaluation": {"clean": clean, "worst": worst, "worst_attack": "pgd on all"}}}}

    assert _outcome(payload(-10.0, -15.0), 20) == [
        "clean return -10.00 -> -10.00, worst case under the attack suite -20.00 -> -15.00 (pgd on all; 20 episodes "
        "each, same seeds)"]
    worse = _outcome(payload(-12.0, -25.0), 20)
    assert len(worse) == 2 and worse[1].startswith(
        "warning: the repair lowered the clean return and the worst case on these episodes")
    assert _outcome(payload(-10.0, -25.0), 20)[1].startswith("warning: the repair lowered the worst case on")
    assert _outcome({"original": {}, "variants": {"masked": {}}}, 20) == []  # repair.evaluate=false
