"""Several requests on one champion, forgotten in one run: each ticket resolved, evaluated and gated on its own,
one assistant trained for the union of their forget sets, one registered version serving every ticket.

A ticket that fails its own gates is split out to be retried alone; the others go back to be batched again
without it, so a version's assistant is always trained on exactly the tickets it serves."""
from __future__ import annotations

import contextlib

from prefect import flow, get_run_logger

from flows.process_request import finish, needs_review_first, nothing_to_forget, resolve_and_measure, settled_by_error
from tasks.batch import BatchMismatch, batch_id_for, join_batch
from tasks.contracts import Evaluation, ResolvedRequest
from tasks.evaluate import evaluate_unlearning
from tasks.lifecycle import (LeaseLost, audit_event, claim_ticket, end_batch_leases_now, lease_kept, new_runner_id,
                             return_to_queue, transition)
from tasks.register import mark_orphans, register_batch
from tasks.unlearn import train_batch_assistants


@flow(name="process_batch", flow_run_name="batch-{batch_id}", on_crashed=[end_batch_leases_now],
      on_cancellation=[end_batch_leases_now])
def process_batch(ticket_ids: list[str], home: str, profile: str = "demo", batch_id: str = "",
                  await_approval: bool = False) -> dict:
    """{"batch_id", "outcomes": {ticket: status}, "split": tickets to retry alone, "regroup": tickets that passed but
    were returned because a batch-mate failed (to batch again without it)}. Tickets another runner holds are
    left out. Every ticket must be a ULD request on the same target (`tasks.batch.batch_key`). `await_approval`:
    as `process_request`'s."""
    batch_id = batch_id or batch_id_for(ticket_ids)
    runner = new_runner_id()
    claimed = []
    for ticket_id in ticket_ids:
        taken = claim_ticket(home, profile, ticket_id, runner)
        if taken is None:
            continue
        if taken["interrupted_step"] == "registering":
            audit_event(home, profile, ticket_id, "orphaned_versions_marked",
                        {"model_uris": mark_orphans(home, profile, ticket_id)})
        claimed.append(ticket_id)
    with contextlib.ExitStack() as leases:
        for ticket_id in claimed:
            leases.enter_context(lease_kept(home, profile, ticket_id, runner))
        return _BatchRun(home, profile, batch_id, runner, await_approval).run(claimed)


class _BatchRun:
    """One batch's steps, each ticket's status changes made under this run's claim."""

    def __init__(self, home: str, profile: str, batch_id: str, runner: str, await_approval: bool = False):
        self.home, self.profile, self.batch_id, self.runner = home, profile, batch_id, runner
        self.await_approval = await_approval
        self.outcomes: dict[str, str] = {}
        self.started: set[str] = set()  # tickets this run moved out of `received`
        self.logger = get_run_logger()

    def ctx(self, ticket_id: str) -> tuple:
        return (self.home, self.profile, ticket_id)

    def mover(self, ticket_id: str):
        return lambda status, **details: transition(*self.ctx(ticket_id), status, runner=self.runner, **details)

    def result(self, split=(), regroup=()) -> dict:
        return {"batch_id": self.batch_id, "outcomes": dict(self.outcomes), "split": list(split),
                "regroup": list(regroup)}

    def requeue(self, tickets, reason_code: str, detail: str) -> None:
        for ticket_id in tickets:
            return_to_queue(*self.ctx(ticket_id), self.runner, reason_code, detail)
            self.outcomes[ticket_id] = "received"

    def run(self, tickets: list[str]) -> dict:
        members: dict[str, ResolvedRequest] = {}
        try:
            for ticket_id in tickets:
                resolved = self.resolve(ticket_id)
                if resolved is not None:
                    members[ticket_id] = resolved
            if not members:
                return self.result()
            return self.forget_together(members)
        except LeaseLost:
            raise
        except BatchMismatch as exc:  # the champion moved between resolutions: each alone is still right
            self.requeue(members, "split_from_batch", str(exc))
            return self.result(split=list(members))
        except Exception as exc:  # unexpected: recorded (its type only) on every ticket it stopped, then raised
            for ticket_id in tickets:
                if ticket_id in self.outcomes:
                    continue
                if ticket_id in self.started:
                    self.mover(ticket_id)("failed", reason_code="internal_error", detail=type(exc).__name__)
                    self.outcomes[ticket_id] = "failed"
                else:
                    self.requeue([ticket_id], "batch_failed", f"batch {self.batch_id} stopped before this ticket")
            raise

    def resolve(self, ticket_id: str) -> ResolvedRequest | None:
        """The ticket's own forget and retain sets, or None when it settles here (its status recorded)."""
        move = self.mover(ticket_id)
        self.started.add(ticket_id)
        try:
            resolved, known = resolve_and_measure(self.ctx(ticket_id), move)
        except LeaseLost:
            raise
        except Exception as exc:
            settled = settled_by_error(ticket_id, exc, move)
            if settled is None:
                raise
            self.outcomes[ticket_id] = settled["status"]
            return None
        if needs_review_first(known):
            move("needs_review", reason_code="nothing_to_forget", detail=nothing_to_forget(known))
            self.outcomes[ticket_id] = "needs_review"
            return None
        return resolved

    def forget_together(self, members: dict[str, ResolvedRequest]) -> dict:
        tickets = sorted(members)
        for ticket_id in tickets:
            self.mover(ticket_id)("training", audit_payload={"batch_id": self.batch_id, "tickets": len(tickets)})
        joined, in_batch = join_batch(self.home, self.profile, self.batch_id, members)
        trained = train_batch_assistants(self.home, self.profile, self.batch_id, tickets, joined, "uld")
        for ticket_id in tickets:
            audit_event(*self.ctx(ticket_id), "unlearning_trained",
                        {**trained.audit_payload(), "batch_id": self.batch_id, "forget_count": joined.forget_count})
        if not trained.converged:  # alone, each forget set is smaller: give each its own assistant
            self.requeue(tickets, "split_from_batch", f"the batch's assistant did not converge: "
                         f"{trained.convergence_detail()}")
            return self.result(split=tickets)
        evaluations: dict[str, Evaluation] = {}
        for ticket_id in tickets:
            self.mover(ticket_id)("evaluating")
            evaluations[ticket_id] = evaluate_unlearning(*self.ctx(ticket_id), in_batch[ticket_id], trained)
            audit_event(*self.ctx(ticket_id), "evaluated", {"metrics": evaluations[ticket_id].metrics,
                                                            "gates": list(evaluations[ticket_id].gates)})
        failed = [t for t in tickets if not evaluations[t].passed]
        if failed:
            return self.split_out(failed, [t for t in tickets if t not in failed], evaluations)
        for ticket_id in tickets:
            self.mover(ticket_id)("registering")
        registered = register_batch(self.home, self.profile, self.batch_id, joined, trained, evaluations)
        for ticket_id in tickets:
            audit_event(*self.ctx(ticket_id), "model_registered", {
                "model_uri": registered.model_uri, "aliases": list(registered.aliases),
                "mlflow_run_id": registered.mlflow_run_id, "batch_id": self.batch_id, "tickets": tickets})
            done = finish(self.ctx(ticket_id), self.mover(ticket_id), registered, evaluations[ticket_id],
                          report_path=f"evidence_report/{ticket_id}", batch_id=self.batch_id,
                          await_approval=self.await_approval)
            self.outcomes[ticket_id] = done["status"]
        return self.result()

    def split_out(self, failed: list[str], passed: list[str], evaluations: dict[str, Evaluation]) -> dict:
        """Failing tickets go back to run alone; the rest to be batched again without them (their assistant was
        trained on the failing tickets' records too, so it is not registered)."""
        for ticket_id in failed:
            gates = ", ".join(g["gate"] for g in evaluations[ticket_id].failed_gates())
            self.requeue([ticket_id], "split_from_batch", f"failed its own gates in batch {self.batch_id} ({gates}); "
                         "retried alone")
        self.requeue(passed, "batch_split", f"a ticket of batch {self.batch_id} failed its gates; batched again "
                     "without it")
        self.logger.warning("batch %s: %d ticket(s) failed their gates and are retried alone", self.batch_id,
                            len(failed))
        return self.result(split=failed, regroup=passed)
