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


def test_min_gate_drops_negligible_branches_renormalises_and_keeps_the_best():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.5, 0.5, 0.5, 0.5]])
    plain = base.gates_from_scores(scores, temperature=0.2, top_k=None)
    gates = base.gates_from_scores(scores, 0.2, None, min_gate=0.05)
    kept = plain[0] >= 0.05
    assert kept.tolist() == [False, True, True, False]
    torch.testing.assert_close(gates[0], plain[0] * kept / plain[0][kept].sum())
    torch.testing.assert_close(gates[1], plain[1]), "equal gates above the cut all stay"
    single = base.gates_from_scores(torch.linspace(0, 1, 40).unsqueeze(0), 10.0, None, min_gate=0.5)
    assert single.gt(0).sum() == 1 and single[0, -1] == 1, "an input whose gates are all under the cut keeps its best"
    floors = torch.tensor([2.0, 2.0, 2.0, 2.0])
    assert base.gates_from_scores(scores, 0.2, None, floors=floors, min_gate=0.05).eq(0).all(), "abstaining stays"


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


def _instruction_like_queries(generator, tasks: int, per_task: int, dim: int = 48):
    """Unit queries of prompts that share a template, differ by one weak task word, and carry strong fillers drawn
    from one pool for every task (names, cities): the mean embedding of such prompts, as in the translation suite."""
    template = torch.randn(dim, generator=generator)
    task_words = 0.5 * torch.randn(tasks, dim, generator=generator)
    fillers = torch.randn(12, dim, generator=generator)
    picks = torch.randint(0, 12, (tasks, per_task, 2), generator=generator)
    queries = template + task_words.unsqueeze(1) + fillers[picks].sum(dim=2)
    return F.normalize(queries, dim=-1)


def _trained_prototype_router(metric: str, train: torch.Tensor) -> prototype.PrototypeRouter:
    config = SpaRTAConfig(target_modules=["q"], router_prototypes=4, router_metric=metric)
    router = prototype.PrototypeRouter(config, "sequence", train.shape[-1])
    for queries in train:
        router.add_task()
        router.learn_queries(queries)
    return router


def test_discriminant_metric_routes_prompts_that_differ_in_one_word_where_cosine_fails():
    generator = torch.Generator().manual_seed(0)
    queries = _instruction_like_queries(generator, tasks=3, per_task=160)
    train, test = queries[:, :128], queries[:, 128:]
    expected = torch.arange(3).repeat_interleave(test.shape[1])
    accuracy = {}
    for metric in ("cosine", "discriminant"):
        router = _trained_prototype_router(metric, train)
        gates = router.gates(test.reshape(-1, test.shape[-1]), [None] * 3)
        accuracy[metric] = (gates.argmax(-1) == expected).float().mean().item()
    assert accuracy["discriminant"] >= 0.95 and accuracy["cosine"] <= 0.8, accuracy


def test_abstaining_compares_the_scores_and_the_choice_among_tasks_the_choice_scores():
    scores = torch.tensor([[0.95, 0.90], [0.50, 0.40]])
    choice = torch.tensor([[-0.2, 0.6], [0.9, 0.1]])
    gates = base.gates_from_scores(scores, 0.1, None, abstain_threshold=0.8, choice_scores=choice)
    torch.testing.assert_close(gates[0], torch.softmax(choice[0] / 0.1, dim=-1))
    assert torch.equal(gates[1], torch.zeros(2)), "the input below the threshold abstains whatever its choice scores"
    top_one = base.gates_from_scores(scores, 0.1, 1, choice_scores=choice)
    assert top_one.argmax(-1).tolist() == [1, 0]


def test_discriminant_transform_whitens_the_within_task_spread_and_centres_on_the_task_means():
    prototypes = torch.tensor([[[1.0, -0.5, 0.1], [1.0, 0.5, 0.1]], [[1.0, -0.5, -0.1], [1.0, 0.5, -0.1]]])
    counts = torch.tensor([[2, 2], [1, 3]])
    centre, factor = prototype.discriminant_transform(prototypes, counts, shrinkage=0.5)
    task_means = torch.tensor([[1.0, 0.0, 0.1], [1.0, 0.25, -0.1]])
    torch.testing.assert_close(centre, task_means.mean(0))
    scatter = torch.zeros(3, 3)
    for task in range(2):
        for row in range(2):
            deviation = prototypes[task, row] - task_means[task]
            scatter += counts[task, row] * torch.outer(deviation, deviation)
    scatter /= counts.sum()
    covariance = scatter + 0.5 * scatter.trace() / 3 * torch.eye(3)
    torch.testing.assert_close(factor @ factor.T, covariance)
    whitened = prototype.whiten(prototypes, centre, factor)
    torch.testing.assert_close(
        whitened @ whitened.transpose(-1, -2),
        (prototypes - centre) @ covariance.inverse() @ (prototypes - centre).transpose(-1, -2),
    )


def test_whitened_prototypes_are_computed_again_when_the_prototypes_change():
    generator = torch.Generator().manual_seed(1)
    queries = _instruction_like_queries(generator, tasks=3, per_task=40)
    router = _trained_prototype_router("discriminant", queries[:2])

    def assert_current():
        centre, factor = prototype.discriminant_transform(
            router.prototypes, router.counts, router.pooled_query_scatter()
        )
        cached_centre, cached_factor, whitened = router.whitened_prototypes()
        torch.testing.assert_close(cached_factor, factor, rtol=0, atol=0)
        torch.testing.assert_close(whitened, prototype.whiten(router.prototypes, centre, factor), rtol=0, atol=0)

    assert_current()
    router.add_task()
    router.learn_queries(queries[2])
    assert_current()
    router.load_state_dict(
        {**router.state_dict(), "prototypes": router.prototypes.flip(0), "counts": router.counts.flip(0)}
    )
    assert_current()
    router.load_state_dict({**router.state_dict(), "query_scatter": router.query_scatter * 2})
    assert_current()
    router.remove_task(0)
    assert_current()


def test_auto_metric_is_discriminant_under_sequence_prototype_routing_only():
    def metric(granularity="sequence", **kwargs):
        config = SpaRTAConfig(target_modules=["q"], **kwargs)
        router_class = learned.LearnedRouter if kwargs.get("router") == "learned" else prototype.PrototypeRouter
        return router_class(config, granularity, 4).metric

    assert metric() == "discriminant"
    assert metric("token") == "cosine", "under token routing the solve would run for every token of every layer"
    assert metric(router="learned") == "cosine"
    assert (
        metric("token", router_metric="discriminant") == "discriminant" and metric(router_metric="cosine") == "cosine"
    )


def test_discriminant_gates_are_the_softmax_of_the_scaled_whitened_cosine():
    generator = torch.Generator().manual_seed(2)
    queries = _instruction_like_queries(generator, tasks=3, per_task=40)
    router = _trained_prototype_router("discriminant", queries[:, :32])
    test = queries[:, 32:].reshape(-1, queries.shape[-1])
    centre, factor = prototype.discriminant_transform(router.prototypes, router.counts, router.pooled_query_scatter())
    whitened = F.normalize(prototype.whiten(test, centre, factor), dim=-1)
    prototypes = F.normalize(prototype.whiten(router.prototypes, centre, factor), dim=-1)
    cosine = torch.einsum("nd,tpd->ntp", whitened, prototypes).amax(dim=-1)
    expected = torch.softmax(prototype.DISCRIMINANT_SCORE_SCALE * cosine / router.config.router_temperature, dim=-1)
    router.config.router_min_gate = 0.0
    torch.testing.assert_close(router.gates(test, [None] * 3), expected)


def test_query_scatter_is_the_running_mean_of_the_queries_spread_around_their_prototype():
    generator = torch.Generator().manual_seed(3)
    first, second = _instruction_like_queries(generator, tasks=2, per_task=20)
    config = SpaRTAConfig(target_modules=["q"], router_prototypes=1)
    router = prototype.PrototypeRouter(config, "sequence", first.shape[-1])
    router.add_task()
    router.learn_queries(first)
    centred = first - first.mean(dim=0)
    torch.testing.assert_close(router.query_scatter[0], centred.T @ centred / 20)
    router.learn_queries(second)
    residuals = second - router.prototypes[0, 0]
    torch.testing.assert_close(router.query_scatter[0], (centred.T @ centred + residuals.T @ residuals) / 40)
    assert router.query_count.tolist() == [40]


def test_query_spread_is_kept_per_task_and_pooled_by_count():
    generator = torch.Generator().manual_seed(4)
    first, second = _instruction_like_queries(generator, tasks=2, per_task=20)
    router = prototype.PrototypeRouter(SpaRTAConfig(target_modules=["q"], router_prototypes=1), "sequence", 48)
    for queries in (first, second[:10]):
        router.add_task()
        router.learn_queries(queries)
    assert router.query_scatter.shape == (2, 48, 48) and router.query_count.tolist() == [20, 10]
    centred = [first - first.mean(dim=0), second[:10] - second[:10].mean(dim=0)]
    pooled = sum(c.T @ c for c in centred) / 30
    torch.testing.assert_close(router.pooled_query_scatter(), pooled)


def test_removing_a_task_leaves_the_query_spread_of_a_router_that_never_had_it():
    """remove_task is "as if the task had never been added": its share of the spread goes with it."""
    generator = torch.Generator().manual_seed(5)
    queries = _instruction_like_queries(generator, tasks=3, per_task=24)
    config = SpaRTAConfig(target_modules=["q"], router_metric="discriminant")

    def trained(tasks):
        router = prototype.PrototypeRouter(config, "sequence", queries.shape[-1])
        for task in tasks:
            router.add_task()
            router.learn_queries(queries[task])
        return router

    removed, never = trained([0, 1, 2]), trained([0, 2])
    removed.remove_task(1)
    for name, value in never.state_dict().items():
        torch.testing.assert_close(removed.state_dict()[name], value, rtol=0, atol=0, msg=name)
    test = queries.reshape(-1, queries.shape[-1])
    torch.testing.assert_close(removed.gates(test, [None] * 2), never.gates(test, [None] * 2), rtol=0, atol=0)


def test_query_spread_whitens_what_one_prototype_per_task_does_not_show():
    """With one prototype per task the prototypes show no spread within a task; the query scatter kept in training
    does, so that prompts told apart by one weak word route apart, where the prototypes alone misroute."""
    generator = torch.Generator().manual_seed(0)
    queries = _instruction_like_queries(generator, tasks=3, per_task=400)
    train, test = queries[:, :300], queries[:, 300:].reshape(-1, queries.shape[-1])
    expected = torch.arange(3).repeat_interleave(100)
    router = prototype.PrototypeRouter(SpaRTAConfig(target_modules=["q"], router_prototypes=1), "sequence", 48)
    for task_queries in train:
        router.add_task()
        for batch in task_queries.split(16):
            router.learn_queries(batch)

    def accuracy():
        return (router.gates(test, [None] * 3).argmax(-1) == expected).float().mean().item()

    assert accuracy() == 1.0
    router.query_scatter.zero_()
    assert accuracy() < 0.95


def test_sequence_routing_keeps_a_query_scatter_whatever_the_metric():
    """It is (tasks, d, d): one per adapter under sequence routing, kept under any metric (the metric can change at
    any time), none for the per-layer token routers (with the discriminant metric they whiten by the prototypes
    alone)."""
    for metric in ("auto", "cosine", "discriminant"):
        config = SpaRTAConfig(target_modules=["q"], router_metric=metric)
        router = prototype.PrototypeRouter(config, "sequence", 8)
        router.add_task()
        assert router.query_scatter.shape == (1, 8, 8)
        assert prototype.PrototypeRouter(config, "token", 8).query_scatter is None
        assert "query_scatter" not in prototype.PrototypeRouter(config, "token", 8).state_dict()
    assert "query_scatter" not in prototype.PrototypeRouter(config, "token", 8).state_dict()
    discriminant = SpaRTAConfig(target_modules=["q"], router_metric="discriminant")
    assert prototype.PrototypeRouter(discriminant, "token", 8).query_scatter is None
