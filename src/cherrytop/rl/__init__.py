"""The RL core shared by every placement of stage 6 (one process, torchrun, Ray): the experience
record and the step that turns sampled, scored episodes into rewards and advantages."""
