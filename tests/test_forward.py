"""Forward passes: the shared-prompt KV-cache scorer must give the numbers of a plain full forward."""

from __future__ import annotations

import torch

from dynlab.data.tokenize import collate_sequences
from dynlab.losses.logps import segment_sum, token_logps
from dynlab.metrics.functional import sequence_stats, token_stats
from dynlab.models.forward import length_groups, lm_head, response_hidden, shared_prompt_hidden
from dynlab.models.load import ModelSpec, tiny_model


def test_length_groups_bound_padding_and_cover_everything():
    lengths = [5, 40, 6, 41, 7, 100, 5]
    groups = length_groups(lengths, max_padding=0.25)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        real = sum(lengths[i] for i in g)
        assert max(lengths[i] for i in g) * len(g) - real <= 0.25 * real
    assert length_groups([]) == []


def test_shared_prompt_scoring_matches_full_forward():
    torch.manual_seed(0)
    model = tiny_model(ModelSpec(name_or_path="tiny")).eval()
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (9,))
    responses = {f"r{i}": torch.randint(3, vocab, (n,)) for i, n in enumerate([4, 11, 5, 30, 12, 3])}
    # reference: each (prompt, response) as its own full forward
    batch = collate_sequences([prompt.tolist()] * len(responses), [r.tolist() for r in responses.values()], 0)
    with torch.no_grad():
        hidden, targets, seq_index = response_hidden(model, **batch)
        logits = lm_head(model, hidden)
        want_logp = segment_sum(token_logps(logits, targets), seq_index, len(responses))
        want = sequence_stats(token_stats(logits, targets), seq_index, len(responses))
    names = list(responses)
    got_groups = 0
    for group, h, y, idx in shared_prompt_hidden(model, prompt, responses, max_padding=0.1):
        got_groups += 1
        stats = sequence_stats(token_stats(lm_head(model, h), y), idx, len(group))
        for j, name in enumerate(group):
            k = names.index(name)
            torch.testing.assert_close(stats["logp"][j], want_logp[k], rtol=1e-5, atol=1e-4)
            for m in want:
                torch.testing.assert_close(stats[m][j], want[m][k], rtol=1e-5, atol=1e-4)
    assert got_groups > 1  # lengths 3..30 cannot share one group at 10% padding
