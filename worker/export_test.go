package worker

// Clock is the time source a test may give the worker (SetClock).
type Clock = clock

// SetClock makes cfg use clk for everything it times.
func SetClock(cfg *Config, clk Clock) { cfg.clock = clk }
