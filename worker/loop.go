package worker

import (
	"context"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/connectivity"

	"github.com/batonhq/baton/coord"
)

// startState is what Start learned and hands to the loop.
type startState struct {
	err       error
	watchFrom int64 // > 0: etcd answered; watch the owner key from here + 1
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
			return startState{watchFrom: r.rev}
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
	gen          uint64 // bumped at every etcd event: older rounds are stale
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
	if st.watchFrom > 0 && d.AppID() != 0 {
		l.watch(st.watchFrom)
		_, found := d.Current()
		l.searching = !found
	}
	timer := d.cfg.Clock.After(d.cfg.Interval)
	var health <-chan time.Time
	if d.cfg.Client != nil {
		t := time.NewTicker(min(d.cfg.EtcdGrace/3, time.Second))
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
		case <-timer:
			timer = d.cfg.Clock.After(d.cfg.Interval)
			if l.watchCh == nil || l.searching {
				if d.cfg.Client != nil && l.watchCh == nil && d.AppID() != 0 && l.connHealthy() {
					l.resync() // lazy start, or etcd back: watch again
				}
				if l.watchCh == nil || l.searching {
					l.startRound()
				}
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

// watch starts watching the owner key from rev+1.
func (l *loop) watch(rev int64) {
	d := l.d
	ctx, cancel := context.WithCancel(clientv3.WithRequireLeader(d.ctx))
	l.stopWatch = cancel
	l.watchCh = d.cfg.Client.Watch(ctx, d.keys.Owner(d.AppID()), clientv3.WithRev(rev+1))
	d.metrics.setWatching(true)
}

func (l *loop) leaveWatch() {
	l.stopWatch()
	l.stopWatch = func() {}
	l.watchCh = nil
	l.d.metrics.setWatching(false)
}

// resync reads the owner key and watches from there.
func (l *loop) resync() bool {
	d := l.d
	r, err := d.readOwnerKey(d.ctx)
	if err != nil {
		return false
	}
	l.gen++
	if r.owner.Address != "" {
		d.setCurrent(r.owner)
		l.found()
	} else {
		l.searching = true
	}
	l.watch(r.rev)
	return true
}

// apply handles owner-key events: a put points the worker at the new
// owner at once; a deletion starts a round that asks the successor.
func (l *loop) apply(events []*clientv3.Event) {
	d := l.d
	for _, ev := range events {
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
		l.searching = true
		l.startRound()
	}
}

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

// finished takes a round's result. A found server is used unless etcd has
// spoken since the round started; a failed round counts towards
// isolation, and the MaxFailedRounds-th in a row calls OnIsolated.
func (l *loop) finished(out roundOutcome) {
	d := l.d
	l.roundRunning = false
	if out.ok {
		if out.gen == l.gen || l.watchCh == nil {
			d.setCurrent(out.server)
		}
		l.found()
		return
	}
	if d.ctx.Err() != nil {
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
