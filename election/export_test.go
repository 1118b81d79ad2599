package election

// Clock is the time source a test may give the election (SetClock).
type Clock = clock

// SetClock makes cfg use clk for everything it times.
func SetClock(cfg *Config, clk Clock) { cfg.clock = clk }
