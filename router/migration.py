"""Migration: a request whose decode worker dies mid-stream moves to another one.

When a decode worker's call fails UNAVAILABLE (the worker was killed, crashed or
cannot be reached; not a cancel, not a client's bad input, not a failure the
decode worker blames on a prefill worker), the router (router/generation.py,
``_migrate``) sends the request back to ROUTING, at most ``migration_limit``
times (``RouterConfig.migration``/``migration_limit``, ``--no-migration``,
``--migration-limit``). The next call (``next_call``) carries the prompt plus
every token already streamed as its prompt (plan LOCAL or REMOTE by the policy),
``max_tokens`` and ``min_tokens`` reduced by what was streamed, and the same
request id. The client sees one stream: the next delta carries the next token;
usage counts the original prompt and every completion token.

What is preserved: greedy output is identical to an undisturbed run (the new
worker recomputes the same KV and continues from the same sequence); token ids
are never duplicated or missed. What is not: a seeded sampled request draws its
remaining tokens from a generator seeded afresh on the new worker (a valid
sample, not the undisturbed run's tokens); a stop string spanning the migration
point is not seen by the new worker. The text after a migration is decoded by the
router from every output token (``Generator._migrated_text``), so a character split
across the move comes out whole. Each migration counts in
``pdserve:request_migrations_total`` and is logged with the request id.
"""

from __future__ import annotations

import dataclasses

from pdserve.sampling_params import SamplingParams
from router.decode_backend import WorkerError

# A migrating request finding no decode worker up waits this long for one to return
# (a restart is seconds; the router sees it at its next health probe).
MIGRATION_WAIT_S = 10.0
RETRY_TRIED_AFTER_S = 2.0
# A call failing with these on the decode worker's own account means it is gone.
MIGRATING_CODES = frozenset({"UNAVAILABLE"})


def can_migrate(e: WorkerError, aborted: bool, migrations: int, limit: int) -> bool:
    """Whether the call's failure moves the request to another decode worker."""
    return (e.code in MIGRATING_CODES and e.role == "decode" and not aborted
            and migrations < limit)


def next_call(prompt: list[int], output: list[int],
              params: SamplingParams) -> tuple[list[int], SamplingParams]:
    """The prompt and params of a request's next call: after a migration, the tokens
    streamed so far join the prompt and come off the token budgets."""
    n = len(output)
    if not n:
        return prompt, params
    return [*prompt, *output], dataclasses.replace(
        params, max_tokens=params.max_tokens - n, min_tokens=max(params.min_tokens - n, 0))


def nothing_left(prompt: list[int], output: list[int], params: SamplingParams,
                 max_model_len: int) -> bool:
    """Every token the request may make was streamed (its finish was lost with the
    worker): the stream ends with ``length`` instead of moving."""
    return len(output) >= params.max_tokens or len(prompt) + len(output) >= max_model_len
