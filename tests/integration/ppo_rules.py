"""Rule rewards the PPO tests point to as ``module:function``."""


def brevity(prompts, responses, metas):
    """Fewer words is better: a briefly fine-tuned tiny model can learn it by ending with EOS
    sooner, so it tests that PPO follows a reward without a pretrained model."""
    return [-len(r.split()) / 10.0 for r in responses]


def verbosity(prompts, responses, metas):
    """More words is better (or, as a cost, worse): the opposite of brevity."""
    return [len(r.split()) / 10.0 for r in responses]
