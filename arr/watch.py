"""Forgetting watched while the run trains (`probe_steps`), and a budget that stops it (`forgetting_budget`).

Every `probe_steps` optimizer steps `ForgettingWatch` runs the "after" half of the report's probes but the
multiple-choice ones (evaluation.py; the "before" half is the initial model's, cached): the headline's probes, as the
report after training runs them, and the task. knowledge_mc's 385 questions alone cost about 85% of the embedded
default's training, so a round leaves them to the report. It logs the headline `forgetting`, each probe and the task
score through the Trainer's own `log`, so every logger of `report_to`
shows them; the rounds land in metrics.json and report.png from the log history.

With a `forgetting_budget`, each round within it writes a checkpoint (protected from `save_total_limit`'s rotation as
the state's best checkpoint), and the first round over it stops the run; `restore_within_budget` then puts the
adapter of the newest round within budget back in place (step 0: the adapter as it started), so the run ends on it.
The rounds live in the log history, which every checkpoint keeps, so a resumed run knows them. Every process runs
the probes on its own copy of the model (DDP) and takes the mean of the values, so all stop at the same step.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
from accelerate.utils import reduce
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import load_peft_weights
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .evaluation import EvalArgs, after_values, before_values, evaluation_result

HEADLINE = "forgetting"  # the logged key of a round's headline; each probe is logged as PROBE_PREFIX + its name
PROBE_PREFIX = "probe/"


def probe_rounds(log_history: list[dict]) -> list[dict]:
    """The rounds of a run's log history: {"step", "forgetting", and each probe's value}."""
    return [{"step": h["step"], HEADLINE: h[HEADLINE],
             **{k.removeprefix(PROBE_PREFIX): v for k, v in h.items() if k.startswith(PROBE_PREFIX)}}
            for h in log_history if HEADLINE in h]


class ForgettingWatch(TrainerCallback):
    def __init__(self, trainer, eval_args: EvalArgs, every: int | None, budget: float | None):
        self.trainer, self.every, self.budget = trainer, every, budget
        self.eval_args = dataclasses.replace(eval_args, knowledge_items=0, mmlu_items=0)
        self.before = self.drift_answers = self.initial = None
        self.kept_step, self.crossed_at = 0, None

    @property
    def model(self):
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def on_train_begin(self, args, state, control, **kwargs):
        with args.main_process_first(desc="the probes' before"):  # one process computes, the rest read the cache
            self.before, self.drift_answers = before_values(self.model, self.trainer.processing_class,
                                                            self.eval_args, cache=True)
        within = [r["step"] for r in probe_rounds(state.log_history) if self.within(r[HEADLINE])]
        self.kept_step = within[-1] if within else 0  # a resumed run's rounds are in its restored log history
        if state.global_step == 0 and self.budget is not None:  # the rollback when no round is within budget
            self.initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}
        self.model.train()

    def within(self, forgetting: float) -> bool:
        return self.budget is None or forgetting <= self.budget

    def on_step_end(self, args, state, control, **kwargs):
        if not self.every or state.global_step % self.every:
            return
        model = self.model
        after = after_values(model.eval(), self.trainer.processing_class, self.eval_args, self.drift_answers)
        model.train()
        values = torch.tensor(list(after.values()), dtype=torch.float64, device=args.device)
        if args.world_size > 1:  # (the same model on every process: one value, so that all decide alike)
            values = reduce(values, reduction="mean")
        after = dict(zip(after, values.tolist()))
        result = evaluation_result(self.before, after, self.eval_args)
        should_log = control.should_log  # (a log call clears it: the step's own loss log still has to come)
        self.trainer.log({HEADLINE: result[HEADLINE], **{PROBE_PREFIX + k: v for k, v in after.items()}})
        control.should_log = should_log
        if self.within(result[HEADLINE]):
            if self.budget is not None:  # a checkpoint to roll back to, kept from rotation
                self.kept_step, control.should_save = state.global_step, True
                state.best_model_checkpoint = os.path.join(args.output_dir,
                                                           f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            return
        self.crossed_at, control.should_training_stop = state.global_step, True
        if state.is_world_process_zero:
            print(f"\nforgetting {result[HEADLINE]:+.4f} nats/token at step {state.global_step} crossed "
                  f"forgetting_budget {self.budget}: stopping, and keeping the adapter of step {self.kept_step}",
                  file=sys.stderr, flush=True)

    def restore_within_budget(self) -> dict | None:
        """After a run the budget stopped: the adapter of the newest round within budget put back in place. Returns
        {"budget", "crossed_at", "kept_step"} (the last two None when the budget did not stop the run), None without
        a budget."""
        if self.budget is None:
            return None
        if self.crossed_at is None:
            return {"budget": self.budget, "crossed_at": None, "kept_step": None}
        model = self.model
        if self.kept_step:
            folder = os.path.join(self.trainer.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.kept_step}")
            weights = load_peft_weights(folder, device=str(next(model.parameters()).device))
        elif self.initial is not None:
            weights = self.initial
        else:  # resumed before any round was within budget: the step-0 adapter was not kept
            return {"budget": self.budget, "crossed_at": self.crossed_at, "kept_step": self.crossed_at}
        set_peft_model_state_dict(model, weights, adapter_name=model.active_adapter)
        return {"budget": self.budget, "crossed_at": self.crossed_at, "kept_step": self.kept_step}
