"""How a transformed model is trained: data, schedules, executors, transports."""
