package worker

import (
	"context"
	"math/rand/v2"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/connectivity"

	"github.com/batonhq/baton/coord"
)

// startState is what Start learned and hands to the loop.
type startState struct {
	err    error
	etcdOK bool // etcd answered during Start
}

// initialState resolves the app and finds the first server: from etcd's
// owner key when etcd answers, else by a polling round.
func (d *Discovery) initialState(ctx context.Context) startState {
	etcdOK := false
	if d.cfg.Client != nil {
		pctx, cancel := context.WithTimeout(ctx, d.cfg.RequestTimeout)
		etcdOK = coord.Probe(pctx, d.cfg.Client) == nil
		cancel()
	}
	if err := d.resolveApp(ctx, etcdOK); err != nil {
		return startState{err: err}
	}
	if etcdOK {
		if r, err := d.readOwnerKey(ctx); err == nil {
			if r.owner.Address != "" {
				d.setCurrent(r.owner)
			} else if s, ok := d.round(ctx, roundInput{useEtcd: true}); ok {
				d.setCurrent(s)
			}
			return startState{etcdOK: true}
		}
	}
	if s, ok := d.round(ctx, roundInput{}); ok {
		d.setCurrent(s)
	}
	return startState{}
}

// roundInput is what a discovery round starts from.
type roundInput struct {
	current   Server
	prevOwner string // the owner that just left, not to be asked first
	useEtcd   bool   // etcd answers: ask the live servers it lists first
}

// round asks servers for the app's owner, in order: with etcd, the live
// servers ranked for the app (its successor first, the owner that left
// excluded); without, the current server; then the configured servers.
// It resolves the app first if that is still to do.
func (d *Discovery) round(ctx context.Context, in roundInput) (Server, bool) {
	if err := d.resolveApp(ctx, in.useEtcd); err != nil {
		d.logger.Debug("round: app not resolved", "error", err)
		d.metrics.round(false)
		return Server{}, false
	}
	for _, c := range d.candidates(ctx, in) {
		addr, err := d.api.acquire(ctx, c, d.AppID(), in.current.Address)
		if err == nil {
			d.metrics.round(true)
			return Server{Address: addr}, true
		}
		d.logger.Debug("round: server did not answer", "server", c, "error", err)
		if ctx.Err() != nil {
			break
		}
	}
	d.metrics.round(false)
	return Server{}, false
}

func (d *Discovery) candidates(ctx context.Context, in roundInput) []string {
	var out []string
	seen := map[string]bool{}
	add := func(a string) {
		if a != "" && !seen[a] {
			seen[a] = true
			out = append(out, a)
		}
	}
	if in.useEtcd {
		for _, a := range d.rankedServers(ctx, in.prevOwner) {
			add(a)
		}
	} else {
		add(in.current.Address)
	}
	for _, s := range d.servers {
		add(s)
	}
	return out
}

// rankedServers lists the live servers' HTTP addresses in the app's
// successor order, without exclude.
func (d *Discovery) rankedServers(ctx context.Context, exclude string) []string {
	ctx, cancel := context.WithTimeout(ctx, d.cfg.RequestTimeout)
	defer cancel()
	resp, err := d.cfg.Client.Get(ctx, d.keys.ServerPrefix(), clientv3.WithPrefix())
	if err != nil {
		return nil
	}
	byID := map[string]string{}
	var ids []string
	for _, kv := range resp.Kvs {
		rec, err := coord.DecodeServerRecord(kv.Value)
		if err != nil || rec.ServerID == exclude {
			continue
		}
		ep := rec.Protocols[coord.ProtocolHTTP]
		addr := ep.Address
		if ep.ExternalAddress != "" {
			addr = ep.ExternalAddress
		}
		byID[rec.ServerID] = addr
		ids = append(ids, rec.ServerID)
	}
	var out []string
	for _, id := range coord.Rank(d.AppID(), ids) {
		out = append(out, byID[id])
	}
	return out
}

// roundOutcome is a finished round, tagged with the generation it
// started in: a result that etcd has overtaken is dropped.
type roundOutcome struct {
	gen    uint64
	server Server
	ok     bool
}

// loop is the state of the discovery goroutine; only it touches it.
type loop struct {
	d            *Discovery
	watchCh      clientv3.WatchChan // nil while not watching
	stopWatch    context.CancelFunc
	gen          uint64           // bumped at every etcd event: older rounds are stale
	skipUpTo     int64            // events at or below this revision are in the last read
	askSoon      <-chan time.Time // a round after an owner-key deletion
	rounds       chan roundOutcome
	roundRunning bool
	searching    bool // etcd shows no usable owner: poll until one appears
	failed       int  // consecutive rounds without a server
	unhealthy    time.Time
}

// run is the discovery goroutine.
func (d *Discovery) run(st startState) {
	l := &loop{d: d, rounds: make(chan roundOutcome, 1), stopWatch: func() {}}
	defer func() { l.stopWatch() }()
	if st.etcdOK && d.AppID() != 0 && !l.resync() {
		l.startRound()
	}
	timer := d.cfg.Clock.After(d.cfg.Interval)
	var health <-chan time.Time
	if d.cfg.Client != nil {
		t := time.NewTicker(max(min(d.cfg.EtcdGrace/3, time.Second), time.Millisecond))
		defer t.Stop()
		health = t.C
	}
	for {
		select {
		case <-d.ctx.Done():
			return
		case resp, ok := <-l.watchCh:
			if !ok || resp.Err() != nil {
				d.logger.Debug("owner watch broke, reading again", "error", resp.Err())
				l.leaveWatch()
				if !l.resync() {
					l.startRound()
				}
				continue
			}
			l.apply(resp.Events)
		case out := <-l.rounds:
			l.finished(out)
		case <-l.askSoon:
			l.askSoon = nil
			if l.searching {
				l.startRound()
			}
		case <-timer:
			timer = d.cfg.Clock.After(d.cfg.Interval)
			if d.cfg.Client != nil && l.watchCh == nil && l.connHealthy() {
				l.resyncOrResolve() // lazy start, or etcd back: watch again
			}
			if l.watchCh == nil || l.searching {
				l.startRound()
			}
		case addr := <-d.reports:
			if cur, ok := d.Current(); ok && cur.Address == addr {
				l.startRound()
			}
		case <-health:
			l.checkHealth()

		}
	}
}

func (l *loop) leaveWatch() {
	l.stopWatch()
	l.stopWatch = func() {}
	l.watchCh = nil
	l.d.metrics.setWatching(false)
}

// resyncOrResolve watches the owner key again, first resolving the app
// through etcd if that is still to do (an app registered after a lazy
// Start, or etcd unreachable then).
func (l *loop) resyncOrResolve() {
	d := l.d
	if d.AppID() == 0 {
		if err := d.resolveApp(d.ctx, true); err != nil {
			d.logger.Debug("app not resolved yet", "error", err)
			return
		}
	}
	l.resync()
}

// resync starts a watch of the owner key, waits until etcd has created
// it, then reads the key. A watch started from the current revision is
// "synced" in etcd from the first moment and gets events as they are
// written; one started from an older revision waits for etcd's catch-up
// loop, which runs every 100 ms. Events the read already reflects are
// skipped (skipUpTo).
func (l *loop) resync() bool {
	d := l.d
	ctx, cancel := context.WithCancel(clientv3.WithRequireLeader(d.ctx))
	// Watch itself blocks while the client's stream cannot take the
	// request (a dead connection): cancelling ctx is what bounds it.
	giveUp := time.AfterFunc(d.cfg.RequestTimeout, cancel)
	wch := d.cfg.Client.Watch(ctx, d.keys.Owner(d.AppID()), clientv3.WithCreatedNotify())
	created := false
	select {
	case resp, ok := <-wch:
		created = ok && resp.Err() == nil && resp.Created
	case <-ctx.Done():
	}
	if !giveUp.Stop() {
		created = false // the timeout won the race: ctx is cancelled
	}
	if !created {
		cancel()
		return false
	}
	r, err := d.readOwnerKey(d.ctx)
	if err != nil {
		cancel()
		return false
	}
	l.gen++
	l.skipUpTo = r.rev
	l.stopWatch, l.watchCh = cancel, wch
	if r.owner.Address != "" {
		d.setCurrent(r.owner)
		l.found()
	} else {
		// No owner: the same as seeing its key deleted.
		l.searching = true
		l.startRound()
	}
	d.metrics.setWatching(true)
	return true
}

// apply handles owner-key events: a put points the worker at the new
// owner at once; a deletion starts a round that asks the successor.
func (l *loop) apply(events []*clientv3.Event) {
	d := l.d
	for _, ev := range events {
		if ev.Kv.ModRevision <= l.skipUpTo {
			continue // already in the read that started this watch
		}
		l.gen++
		if ev.Type == clientv3.EventTypePut {
			rec, err := coord.DecodeOwnerRecord(ev.Kv.Value)
			if s, ok := d.serverFromRecord(rec, ev.Kv.ModRevision); err == nil && ok {
				d.setCurrent(s)
				l.found()
				continue
			}
			d.logger.Warn("owner record unusable; asking the servers", "error", err)
		}
		// The owner left. Its successor is electing itself right now and
		// its put usually arrives within milliseconds; give it a short,
		// jittered moment before asking over HTTP, so that a thousand
		// workers of one app do not all hit the successor (and etcd) at
		// the instant it is busiest. A put cancels the round.
		l.searching = true
		if l.askSoon == nil {
			l.askSoon = time.After(deleteGrace/2 + time.Duration(rand.Int64N(int64(deleteGrace))))
		}
	}
}

// deleteGrace spreads the HTTP rounds that follow an owner-key deletion
// over [deleteGrace/2, 1.5×deleteGrace).
const deleteGrace = 100 * time.Millisecond

// startRound runs a discovery round in its own goroutine unless one is
// running already.
func (l *loop) startRound() {
	if l.roundRunning {
		return
	}
	d := l.d
	l.roundRunning = true
	cur, _ := d.Current()
	in := roundInput{current: cur, prevOwner: cur.ServerID, useEtcd: l.watchCh != nil}
	gen := l.gen
	d.wg.Go(func() {
		s, ok := d.round(d.ctx, in)
		l.rounds <- roundOutcome{gen: gen, server: s, ok: ok}
	})
}

// finished takes a round's result. A round that etcd has overtaken (an
// owner-key event arrived while it ran) is stale: its answer is dropped,
// and if etcd now shows no owner a fresh round starts at once. A failed
// round counts towards isolation, and the MaxFailedRounds-th in a row
// calls OnIsolated.
func (l *loop) finished(out roundOutcome) {
	d := l.d
	l.roundRunning = false
	stale := out.gen != l.gen && l.watchCh != nil
	switch {
	case out.ok && l.watchCh != nil:
		// While etcd answers, it alone says who the owner is: the round
		// has made the server asked elect an owner if there was none,
		// and that owner's put arrives on the watch. An HTTP answer — a
		// deposed owner's stale table, say — never overrides it.
		l.failed = 0
		return
	case out.ok && !stale:
		d.setCurrent(out.server)
		l.found()
		return
	case out.ok || stale && !l.searching:
		// Overtaken: etcd's answer is newer than this round's.
		if l.searching {
			l.startRound()
		}
		return
	case d.ctx.Err() != nil:
		return
	}
	l.failed++
	d.logger.Warn("no server found in this round", "consecutive", l.failed)
	if l.failed == d.cfg.MaxFailedRounds {
		d.logger.Error("isolated: no server for consecutive rounds", "rounds", l.failed)
		d.metrics.isolated()
		if d.cfg.OnIsolated != nil {
			d.cfg.OnIsolated()
		}
	}
	if stale && l.searching {
		l.startRound() // the owner left while this round ran: ask again now
	}
}

// found resets the search and the isolation count.
func (l *loop) found() {
	l.searching = false
	l.failed = 0
}

// checkHealth moves between watching and polling with the etcd
// connection's state: a connection not ready for EtcdGrace means polling;
// a ready one means watching again.
func (l *loop) checkHealth() {
	d := l.d
	if l.connHealthy() {
		l.unhealthy = time.Time{}
		if l.watchCh == nil && d.AppID() != 0 {
			if l.resync() {
				d.logger.Info("etcd reachable again; watching the owner key")
			}
		}
		return
	}
	if l.watchCh == nil {
		return
	}
	if l.unhealthy.IsZero() {
		l.unhealthy = time.Now()
		return
	}
	if time.Since(l.unhealthy) >= d.cfg.EtcdGrace {
		d.logger.Warn("etcd unreachable; polling the servers", "for", time.Since(l.unhealthy))
		l.leaveWatch()
		l.startRound()
	}
}

func (l *loop) connHealthy() bool {
	switch l.d.cfg.Client.ActiveConnection().GetState() {
	case connectivity.Ready, connectivity.Idle:
		return true
	}
	return false
}
