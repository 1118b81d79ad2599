package integration

import (
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/batonhq/baton/election/electiontest"
)

// nodeEvent is one JSON line of examples/node.
type nodeEvent struct {
	Event  string `json:"event"`
	Server string `json:"server"`
	App    int64  `json:"app"`
	Token  int64  `json:"token"`
	Reason string `json:"reason"`
	Seq    int64  `json:"seq"` // pairs an end with its acquire
	Addr   string `json:"addr"`
	MonoNs int64  `json:"monoNs"`
}

// interval is one ownership of one app by one server process, on
// CLOCK_MONOTONIC: from its acquire to its end stamp (the earlier of the
// context's cancellation and the guard deadline), or to the instant the
// process was killed.
type interval struct {
	server     string
	app, token int64
	start, end int64 // end 0: still open
}

// checker collects every node's ownership events and checks the
// guarantees: no two servers' intervals of one app overlap, and tokens of
// an app strictly increase from one server's ownership to the next.
type checker struct {
	mu        sync.Mutex
	open      map[string]*interval // server/app/token/seq → open interval
	intervals []*interval
	changed   chan struct{}
}

func newChecker() *checker {
	return &checker{open: map[string]*interval{}, changed: make(chan struct{})}
}

// key names one acquisition: a server can acquire the same token again
// (after its guard resumed) before the end of the previous interval has
// arrived, so the acquisition's sequence number is part of the key.
func key(e nodeEvent) string { return fmt.Sprintf("%s/%d/%d/%d", e.Server, e.App, e.Token, e.Seq) }

func (c *checker) add(e nodeEvent) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch e.Event {
	case "acquire":
		iv := &interval{server: e.Server, app: e.App, token: e.Token, start: e.MonoNs}
		c.open[key(e)] = iv
		c.intervals = append(c.intervals, iv)
	case "end":
		if iv := c.open[key(e)]; iv != nil {
			iv.end = e.MonoNs
			delete(c.open, key(e))
		}
	default:
		return
	}
	close(c.changed)
	c.changed = make(chan struct{})
}

// killed closes every open interval of server at the instant it was
// killed: a dead process acts no more.
func (c *checker) killed(server string, at int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, iv := range c.open {
		if iv.server == server {
			iv.end = at
			delete(c.open, k)
		}
	}
	close(c.changed)
	c.changed = make(chan struct{})
}

// changes returns a channel closed at the next event.
func (c *checker) changes() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.changed
}

// openIntervals returns, per app, the open intervals.
func (c *checker) openIntervals() map[int64][]interval {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[int64][]interval{}
	for _, iv := range c.open {
		out[iv.app] = append(out[iv.app], *iv)
	}
	return out
}

// owners returns, per app, the servers holding an open interval.
func (c *checker) owners() map[int64][]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[int64][]string{}
	for _, iv := range c.open {
		out[iv.app] = append(out[iv.app], iv.server)
	}
	return out
}

// begunAfter returns the intervals of server that began after at
// (CLOCK_MONOTONIC).
func (c *checker) begunAfter(server string, at int64) []interval {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []interval
	for _, iv := range c.intervals {
		if iv.server == server && iv.start > at {
			out = append(out, *iv)
		}
	}
	return out
}

// waitOwned waits until every app in apps has exactly one open interval
// among the servers other than exclude (whose intervals may still be open
// because it is paused or cut off: its end stamps arrive when it runs
// again, and verdict checks them then), and returns how long that took.
func (c *checker) waitOwned(apps []int64, exclude string, timeout time.Duration) (time.Duration, error) {
	start := time.Now()
	deadline := time.After(timeout)
	for {
		c.mu.Lock()
		ch := c.changed
		c.mu.Unlock()
		owners := c.owners()
		done := true
		for _, app := range apps {
			n := 0
			for _, s := range owners[app] {
				if s != exclude {
					n++
				}
			}
			if n != 1 {
				done = false
			}
		}
		if done {
			return time.Since(start), nil
		}
		select {
		case <-ch:
		case <-deadline:
			return 0, fmt.Errorf("after %v, owners are %v", timeout, owners)
		}
	}
}

// verdict lists every violation seen so far.
func (c *checker) verdict() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := electiontest.MonoNow()
	byApp := map[int64][]*interval{}
	for _, iv := range c.intervals {
		byApp[iv.app] = append(byApp[iv.app], iv)
	}
	var problems []string
	for app, ivs := range byApp {
		sort.Slice(ivs, func(i, j int) bool { return ivs[i].start < ivs[j].start })
		for i, a := range ivs {
			aEnd := a.end
			if aEnd == 0 {
				aEnd = now
			}
			for _, b := range ivs[i+1:] {
				if b.server != a.server && b.start < aEnd {
					problems = append(problems, fmt.Sprintf("app %d: %s (token %d) and %s (token %d) overlap by %v",
						app, a.server, a.token, b.server, b.token, time.Duration(aEnd-b.start)))
				}
			}
			if i > 0 {
				p := ivs[i-1]
				if a.token < p.token || a.token == p.token && a.server != p.server {
					problems = append(problems, fmt.Sprintf("app %d: token %d (%s) follows %d (%s)", app, a.token, a.server, p.token, p.server))
				}
			}
		}
	}
	return problems
}

// handoff is one move of an app between servers: an ownership that began
// on another server than the app's previous one.
type handoff struct {
	app      int64
	from, to string
	token    int64
	start    int64 // CLOCK_MONOTONIC
}

// movesAfter lists the moves whose ownership began after at
// (CLOCK_MONOTONIC), in order of their start. An app's first ownership
// is no move, nor is a server taking an app back with the same token
// (after its guard resumed).
func (c *checker) movesAfter(at int64) []handoff {
	c.mu.Lock()
	defer c.mu.Unlock()
	byApp := map[int64][]*interval{}
	for _, iv := range c.intervals {
		byApp[iv.app] = append(byApp[iv.app], iv)
	}
	var out []handoff
	for app, ivs := range byApp {
		sort.Slice(ivs, func(i, j int) bool { return ivs[i].start < ivs[j].start })
		for i := 1; i < len(ivs); i++ {
			if ivs[i].start > at && ivs[i].server != ivs[i-1].server {
				out = append(out, handoff{app: app, from: ivs[i-1].server, to: ivs[i].server, token: ivs[i].token, start: ivs[i].start})
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].start < out[j].start })
	return out
}
