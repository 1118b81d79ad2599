package integration

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/batonhq/baton/worker"
)

// unreachable: an owner is cut off from etcd and from its peers, while
// its HTTP port still answers workers — from its stale table until its
// guard fires. A worker of each of its apps reports the owner unreachable
// every 50 ms, as its own failing traffic would (so do the group's
// workers that are at it), which sends them asking the other servers —
// or, when those are cut off from the workers too, in the end the
// deposed owner — and sometimes another server is asked to take the apps
// over as well.
// Once the step is live, every worker names the new owner with its token
// (settle), and none of the step's workers went back to the deposed
// ownership after it had followed a newer one.
func (g *group) unreachable(ctx context.Context) (outcome, error) {
	o := outcome{kind: "unreachable"}
	a, b, apps := g.pickTakeover()
	keys, err := g.ownerKeys(ctx)
	if err != nil {
		return o, err
	}
	before := map[int64]int64{} // app → a's token when the step began
	for _, app := range apps {
		if k := keys[app]; k.serverID == a.id {
			before[app] = k.token
		}
	}
	var trails []*trail
	hc := &hostCount{next: &http.Transport{}, sent: map[string]int{}, answered: map[string]int{}}
	o.release = hc.next.CloseIdleConnections
	tune := func(cfg *worker.Config) {
		// One quick try per server, so that a round that finds the
		// other servers unreachable reaches the deposed owner in time.
		cfg.HTTPClient = &http.Client{Transport: hc}
		cfg.Tries, cfg.RequestTimeout, cfg.PingTimeout = 1, 300*time.Millisecond, 300*time.Millisecond
	}
	for _, app := range apps {
		tr := &trail{app: app}
		d, err := g.newWorker(g.appName[app], tr.add, tune)
		if err != nil {
			return o, err
		}
		tr.name = fmt.Sprintf("%s/%s (step %d)", g.name, g.appName[app], g.step)
		o.workers = append(o.workers, follower{name: tr.name, d: d})
		trails = append(trails, tr)
	}
	ttlA := g.c.ttlOf(a.id)
	// Sometimes the workers cannot reach the other servers either: their
	// rounds then end at the deposed owner, whose HTTP still answers.
	var others []*proc
	if g.rng.IntN(2) == 0 {
		for _, id := range g.ids {
			if id != a.id {
				others = append(others, g.c.nodes[id])
			}
		}
	}
	a.partition(true)
	a.partitionFromPeers(true)
	for _, p := range others {
		p.front.PauseTx()
		p.front.PauseRx()
	}
	cut := time.Now()
	var asked sync.WaitGroup
	took := "not asked"
	if g.rng.IntN(2) == 0 {
		names := g.names()
		asked.Go(func() { took = "asked: " + acquireAll(g.c, b, apps, names) })
	}
	hold := between(g.rng, 300*time.Millisecond, ttlA+time.Second)
	reports := 0
	tick := time.NewTicker(50 * time.Millisecond)
	for time.Since(cut) < hold && ctx.Err() == nil {
		for _, f := range slices.Concat(g.workers, o.workers) {
			if cur, ok := f.d.Current(); ok && cur.Address == a.public {
				f.d.ReportUnreachable(cur.Address)
				reports++
			}
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
		}
	}
	tick.Stop()
	a.partition(false)
	a.partitionFromPeers(false)
	for _, p := range others {
		p.front.UnpauseTx()
		p.front.UnpauseRx()
	}
	o.healed = time.Now()
	sentA, answeredA, sent, answered := hc.counts(a.public)
	othersCut := ""
	if len(others) > 0 {
		othersCut = ", the other servers cut off from the workers"
	}
	o.what = fmt.Sprintf("cut %s off from etcd and peers (TTL %v, %d apps) for %v, its HTTP answering%s; %d reports of it as unreachable "+
		"(the step's workers asked it %d times, %d answered; the others %d times, %d answered); %s (TTL %v)",
		a.id, ttlA, len(apps), hold.Round(time.Millisecond), othersCut, reports, sentA, answeredA, sent, answered, b.id, g.c.ttlOf(b.id))
	o.pending = func() string { asked.Wait(); return " " + took }
	o.after = func(ctx context.Context) []string {
		keys, err := g.ownerKeys(ctx)
		if err != nil {
			return nil // settle has just read them; a failure here proves nothing
		}
		var problems []string
		for _, tr := range trails {
			token, owned := before[tr.app]
			if k := keys[tr.app]; owned && k.token > token {
				if p := tr.backToDeposed(a.public, token); p != "" {
					problems = append(problems, fmt.Sprintf("%s: worker %s %s", g.name, tr.name, p))
				}
			}
		}
		return problems
	}
	return o, ctx.Err()
}

// hostCount is an http.RoundTripper that counts requests by host, and
// those answered.
type hostCount struct {
	next     *http.Transport
	mu       sync.Mutex
	sent     map[string]int
	answered map[string]int
}

func (h *hostCount) RoundTrip(req *http.Request) (*http.Response, error) {
	h.mu.Lock()
	h.sent[req.URL.Host]++
	h.mu.Unlock()
	resp, err := h.next.RoundTrip(req)
	if err == nil {
		h.mu.Lock()
		h.answered[req.URL.Host]++
		h.mu.Unlock()
	}
	return resp, err
}

// counts returns the requests to host and those answered, then the same
// for every other host.
func (h *hostCount) counts(host string) (sentTo, answeredBy, sentElse, answeredElse int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for k, n := range h.sent {
		if k == host {
			sentTo += n
		} else {
			sentElse += n
		}
	}
	for k, n := range h.answered {
		if k == host {
			answeredBy += n
		} else {
			answeredElse += n
		}
	}
	return
}

// trail is every server a worker switched to, in order.
type trail struct {
	name string
	app  int64
	mu   sync.Mutex
	seen []worker.Server
}

func (t *trail) add(s worker.Server) {
	t.mu.Lock()
	t.seen = append(t.seen, s)
	t.mu.Unlock()
}

func (t *trail) backToDeposed(deposed string, token int64) string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return backToDeposed(t.seen, deposed, token)
}

// backToDeposed says whether a worker that switched to the servers in
// seen went back to the deposed ownership — the server at address
// deposed with a token up to token, or with none (an HTTP answer) —
// after it had followed a newer ownership; "" if it did not.
func backToDeposed(seen []worker.Server, deposed string, token int64) string {
	moved := -1
	for i, s := range seen {
		if moved < 0 && s.Address != deposed && s.Token > token {
			moved = i
			continue
		}
		if moved >= 0 && s.Address == deposed && s.Token <= token {
			return fmt.Sprintf("went back to the deposed owner at %s (token %d; its ownership had token %d) after following %s (%q token %d): trail %+v",
				deposed, s.Token, token, seen[moved].Address, seen[moved].ServerID, seen[moved].Token, seen)
		}
	}
	return ""
}
