package election

import "context"

// Clock is the time source a test may give the election (SetClock).
type Clock = clock

// SetClock makes cfg use clk for everything it times.
func SetClock(cfg *Config, clk Clock) { cfg.clock = clk }

// Rewatch restarts the owner watch on a new stream, as the guard firing
// does.
func (e *Elector) Rewatch() {
	select {
	case e.rewatch <- struct{}{}:
	default:
	}
}

// RequestProgress is the guard's progress request for the owner watch.
func (e *Elector) RequestProgress(ctx context.Context) error { return e.requestProgress(ctx) }

// OwnerWatch identifies the open owner watch generation; nil while it
// restarts.
func (e *Elector) OwnerWatch() any {
	e.watchMu.Lock()
	defer e.watchMu.Unlock()
	if e.watchMD == nil {
		return nil
	}
	return e.watchMD
}
