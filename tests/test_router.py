from __future__ import annotations

import torch
from torch.nn import functional as F

from peft_sparta import SpaRTAConfig
from peft_sparta.config import DEFAULT_ABSTAIN_SPREAD
from peft_sparta.routers import base, learned, prototype, spectral


def test_prototypes_are_the_means_of_their_assigned_queries():
    torch.manual_seed(0)
    cluster_a = F.normalize(torch.tensor([1.0, 0.0, 0.0]) + 0.05 * torch.randn(20, 3), dim=-1)
    cluster_b = F.normalize(torch.tensor([0.0, 1.0, 0.0]) + 0.05 * torch.randn(20, 3), dim=-1)
    prototypes, counts = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    prototype.update_prototypes(prototypes, counts, torch.stack([cluster_a[0], cluster_b[0]]))
    for batch in range(1, 20, 5):
        prototype.update_prototypes(
            prototypes, counts, torch.cat([cluster_a[batch : batch + 5], cluster_b[batch : batch + 5]])
        )
    assert counts.tolist() == [20, 20]
    assert torch.allclose(prototypes[0], cluster_a.mean(0), atol=1e-6)
    assert torch.allclose(prototypes[1], cluster_b.mean(0), atol=1e-6)


def test_empty_task_never_wins_and_scores_pick_the_nearest_prototype():
    prototypes = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    counts = torch.tensor([[3, 0], [2, 0], [0, 0]])
    queries = F.normalize(torch.tensor([[1.0, 0.1], [-0.1, 1.0], [-1.0, -1.0]]), dim=-1)
    scores = prototype.prototype_scores(queries, prototypes, counts)
    assert scores.argmax(-1).tolist() == [0, 1, 0] or scores.argmax(-1).tolist() == [0, 1, 1]
    assert (scores[:, 2] == prototype.EMPTY_TASK_SCORE).all()


def test_top_k_gates_keep_k_tasks_and_sum_to_one():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3]])
    gates = base.gates_from_scores(scores, temperature=0.1, top_k=2)
    assert (gates > 0).sum() == 2 and gates[0, 1] > gates[0, 2] > 0
    assert torch.allclose(gates.sum(-1), torch.ones(1))
    assert torch.allclose(base.gates_from_scores(scores, 0.1, None).sum(-1), torch.ones(1))


def test_spectral_directions_are_the_right_singular_vectors_of_the_product():
    torch.manual_seed(1)
    a, b = torch.randn(4, 10), torch.randn(7, 4)
    directions = spectral.spectral_directions(a, b, 3)
    _, _, vh = torch.linalg.svd(b @ a)
    overlap = (directions @ vh[:3].T).abs()
    assert torch.allclose(overlap, torch.eye(3), atol=1e-4)
    assert spectral.spectral_directions(a, b, 6)[4:].abs().sum() == 0


def test_router_loss_pulls_keys_to_their_task():
    torch.manual_seed(2)
    keys = torch.nn.Parameter(torch.randn(2, 5))
    queries_b = F.normalize(torch.randn(1, 5).repeat(8, 1) + 0.01 * torch.randn(8, 5), dim=-1)
    optimizer = torch.optim.SGD([keys], lr=0.5)
    for _ in range(50):
        loss = learned.router_loss(queries_b, keys, task=1, temperature=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (learned.key_scores(queries_b, keys.detach()).argmax(-1) == 1).all()


def test_gates_abstain_below_every_task_floor_and_are_unchanged_above_one():
    scores = torch.tensor([[0.95, 0.20], [0.85, 0.70], [0.50, 0.75]])
    plain = base.gates_from_scores(scores, 0.1, None)
    gates = base.gates_from_scores(scores, 0.1, None, floors=torch.tensor([0.9, 0.72]))
    assert torch.equal(gates[[0, 2]], plain[[0, 2]]), "row 2 reaches task 1's floor though task 0 scores higher"
    assert torch.equal(gates[1], torch.zeros(2))


def test_prototype_floors_follow_each_task_spread():
    """Each prototype's norm R is its n unit queries' mean similarity to it; the floor is 1 - spread * (1 - the
    count-weighted mean of the unbiased sqrt((n R^2 - 1) / (n - 1))); single-query prototypes are left out."""
    router = prototype.PrototypeRouter(SpaRTAConfig(target_modules=["q"], router_prototypes=2), "token", 2)
    for _ in range(3):
        router.add_task()
    router.prototypes.copy_(torch.tensor([[[0.9, 0.0], [0.0, 0.8]], [[0.5, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0, 0]]]))
    router.counts.copy_(torch.tensor([[3, 2], [5, 1], [1, 0]]))
    rho = lambda n, norm: ((n * norm**2 - 1) / (n - 1)) ** 0.5  # noqa: E731
    mean_similarity = torch.tensor([(3 * rho(3, 0.9) + 2 * rho(2, 0.8)) / 5, rho(5, 0.5)])
    floors = router.score_floors(2.0)
    torch.testing.assert_close(floors[:2], 1 - 2.0 * (1 - mean_similarity))
    assert floors[2] == float("-inf"), "a task with single-query prototypes only has no floor"


def test_gates_abstain_below_the_threshold_and_are_unchanged_above():
    scores = torch.tensor([[0.95, 0.20], [0.50, 0.40], [0.30, 0.91]])
    plain = base.gates_from_scores(scores, 0.1, None)
    gates = base.gates_from_scores(scores, 0.1, None, abstain_threshold=0.9)
    assert torch.equal(gates[[0, 2]], plain[[0, 2]])
    assert torch.equal(gates[1], torch.zeros(2))


def test_auto_abstain_spread_is_the_default_under_sequence_prototype_routing_only():
    def spread(granularity="sequence", **kwargs):
        config = SpaRTAConfig(target_modules=["q"], **kwargs)
        return prototype.PrototypeRouter(config, granularity, 4).abstain_spread

    assert spread() == DEFAULT_ABSTAIN_SPREAD
    assert spread("token") is None, "the calibration splits chose the default under sequence routing"
    assert spread(router_abstain_spread=None) is None and spread("token", router_abstain_spread=3.0) == 3.0
    assert spread(router="learned") is None
