package election

import (
	"sync"
	"time"
)

// unansweredPings remembers, for one PingTimeout, which servers did not
// answer a ping. Without it every election of an app owned by a hung
// server waits out its own ping: a worker asking for ten such apps, or a
// server taking over hundreds, would wait a PingTimeout per app,
// ElectionConcurrency at a time. Treating a server as down for a moment
// longer than it was is safe: the election then overwrites its key with a
// displacement marker, and nobody acts before that server has stopped.
type unansweredPings struct {
	mu    sync.Mutex
	until map[string]time.Time // server id → end of the memory
}

func (u *unansweredPings) recently(server string, now time.Time) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	until, ok := u.until[server]
	if ok && !now.Before(until) {
		delete(u.until, server)
		return false
	}
	return ok
}

func (u *unansweredPings) mark(server string, until time.Time) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.until == nil {
		u.until = map[string]time.Time{}
	}
	u.until[server] = until
}

func (u *unansweredPings) clear(server string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	delete(u.until, server)
}
