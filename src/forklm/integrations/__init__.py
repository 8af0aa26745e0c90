"""forklm inside the tools its users already run: TRL's GRPO trainer (`integrations.trl`) and
EleutherAI's lm-evaluation-harness (`integrations.lm_eval`). Each module imports its tool only
when it is itself imported; forklm does not depend on either."""
