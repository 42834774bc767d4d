"""A GUI-agent environment in the manner of UI-TARS (Qin et al. 2025, arXiv 2501.12326): rendered screens
and instructions (:mod:`jaxlab.models.gui_screens`, :mod:`jaxlab.models.gui_tasks`), actions as text
(:mod:`~jaxlab.rl.gui.actions`: ``click(x, y)``, ``type("...")``, ``scroll(up|down)``, ``finished()``) and
the environment (:mod:`~jaxlab.rl.gui.env`: a pure ``env_step``, the verifier ``task_success``, the
grounding metric ``click_in_box`` and scripted demonstrations, ``demonstration``).

    from jaxlab.models.gui_tasks import make_task
    from jaxlab.rl.gui import demonstration, env_step, reset

    task = make_task(jax.random.PRNGKey(0))             # task.instruction, e.g. "click the Save button"
    state = reset(task)
    for text in demonstration(task):                   # e.g. ["click(41, 23)", "finished()"]
        state, done, success = env_step(state, text)
"""

from jaxlab.rl.gui.actions import (ACTION_SPACE, Click, Finished, Scroll, Type, format_action,
                                   parse_action)
from jaxlab.rl.gui.env import (GUIState, click_in_box, demonstration, env_step, render, replay, reset,
                               task_success)

__all__ = ["ACTION_SPACE", "Click", "Finished", "GUIState", "Scroll", "Type", "click_in_box", "demonstration",
           "env_step", "format_action", "parse_action", "render", "replay", "reset", "task_success"]
