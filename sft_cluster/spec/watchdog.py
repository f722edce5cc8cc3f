"""The job's ``watchdog`` section: when a training step counts as hung (``sft_cluster.driver.watchdog``)."""

from __future__ import annotations

from pydantic import Field, model_validator

from sft_cluster.spec.base import Strict, rule_error

# How much longer than step_timeout_s a collective may wait: the watchdog fires first and gets the
# stacks; the process group's timeout is the backstop for what it does not watch (start-up, the end).
COLLECTIVE_MARGIN_S = 300.0


class WatchdogSpec(Strict):
    """A step is hung when a rank sends no heartbeat for longer than its limit: ``step_timeout_s``
    during warm-up, while saving or evaluating; after warm-up, ``median_multiple`` times the running
    median step time, kept within [``min_limit_s``, ``step_timeout_s``]."""

    enabled: bool = True
    step_timeout_s: float = Field(1800.0, gt=0)
    median_multiple: float = Field(20.0, gt=1)
    warmup_steps: int = Field(10, ge=1)
    min_limit_s: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> WatchdogSpec:
        if self.min_limit_s > self.step_timeout_s:
            raise rule_error(
                f"watchdog.min_limit_s = {self.min_limit_s:g} is above watchdog.step_timeout_s = "
                f"{self.step_timeout_s:g}: the limit after warm-up lies between the two (lower "
                "watchdog.min_limit_s or raise watchdog.step_timeout_s)"
            )
        return self

    @property
    def collective_timeout_s(self) -> float:
        """The process groups' timeout, instead of torch's 30 minutes."""
        return self.step_timeout_s + COLLECTIVE_MARGIN_S
