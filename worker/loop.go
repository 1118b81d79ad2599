package worker

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/connectivity"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/backoff"
)

// startState is what Start learned and hands to the loop.
type startState struct {
	err    error
	etcdOK bool // etcd answered during Start
}

// initialState resolves the app and finds the first server: from etcd's
// owner key when etcd answers, else, if poll allows it, by a polling
// round. The first etcd read (the registry's, until the app id is known)
// is what says whether etcd answers: a fleet starting at once sends each
// request it needs and no probe besides.
func (d *Discovery) initialState(ctx context.Context, poll func() bool) startState {
	var etcdErr error
	if d.cfg.Client != nil {
		etcdErr = d.resolveAppInEtcd(ctx)
		if errors.Is(etcdErr, coord.ErrUnknownApp) {
			return startState{err: etcdErr}
		}
		if etcdErr == nil {
			var r ownerKeyRead
			if r, etcdErr = d.readOwnerKey(ctx); etcdErr == nil {
				return d.startFromEtcd(ctx, r)
			}
		}
		if !poll() {
			return startState{err: fmt.Errorf("worker: etcd did not answer: %w", etcdErr)}
		}
		d.logger.Debug("etcd did not answer; asking the servers", "error", etcdErr)
	}
	if err := d.resolveApp(ctx, false); err != nil {
		return startState{err: err}
	}
	s, ok := d.round(ctx, roundInput{})
	d.metrics.round(ok)
	if ok {
		d.setCurrent(s)
	}
	return startState{}
}

// startFromEtcd takes the first server from a read of the owner key.
// Nobody owning the app, a round makes a server elect an owner, and etcd
// then says who it is, with its token; only if etcd shows nobody still is
// the HTTP answer taken (the watch corrects it).
func (d *Discovery) startFromEtcd(ctx context.Context, r ownerKeyRead) startState {
	if r.owner.Address == "" {
		s, ok := d.round(ctx, roundInput{useEtcd: true})
		d.metrics.round(ok)
		var err error
		if r, err = d.readOwnerKey(ctx); ok && (err != nil || r.owner.Address == "") {
			r.owner = s
		}
	}
	d.setCurrent(r.owner)
	return startState{etcdOK: true}
}

// The loop's retry pauses. Every retry is jittered, so that a fleet of
// workers hit by one event (an etcd leader loss cancels every watch at
// once) does not retry in lockstep.
const (
	resyncPauseMin = 250 * time.Millisecond // after the first failed attempt to watch again
	resyncPauseMax = time.Second            // the longest: how soon a worker watches after etcd is back
)

// loop is the state of the discovery goroutine; only it touches it.
type loop struct {
	d *Discovery

	// Watching.
	watchCh   clientv3.WatchChan // nil while not watching
	stopWatch context.CancelFunc
	watchSeq  uint64   // bumped at every new watch: a check of an older one is dropped
	gen       uint64   // bumped at every change etcd shows: older rounds are stale
	skipUpTo  int64    // events at or below this revision are in the read that started the watch
	known     keyState // the owner key as the worker last learned it from etcd

	// Getting back to watching. While etcd fails the worker it keeps its
	// server and tries to watch again, backing off; only after EtcdGrace
	// does it poll the servers, PowerJob's way.
	resyncs      chan resyncOutcome
	resyncing    bool
	resyncAt     <-chan time.Time
	resyncTries  int
	troubleSince time.Time // etcd has failed the worker since; zero while it serves
	polling      bool      // ask the servers every Interval

	// The periodic re-check of a watch (a cheap read every Interval).
	checks   chan checkOutcome
	checking bool

	// Rounds.
	interval     <-chan time.Time // every Interval: a re-check, or a round while polling
	rounds       chan roundOutcome
	roundRunning bool
	askAt        <-chan time.Time // a round soon, after a jittered pause
	searching    bool             // etcd shows no usable owner: ask until one appears
	failed       int              // consecutive rounds without a server
	reported     string           // the address the last report named
	reportTries  int              // reports of it in a row: they back off
	roundAt      <-chan time.Time // a reported round, held back by the backoff
	reportOK     time.Time        // when the next report may start a round
}

// keyState is the owner key as of revision rev: modRev 0 means no key.
type keyState struct{ rev, modRev int64 }

// resyncOutcome is a finished attempt to watch again: a created watch and
// a read of the key made after it, or an error.
type resyncOutcome struct {
	watch  clientv3.WatchChan
	cancel context.CancelFunc
	read   ownerKeyRead
	err    error
}

// checkOutcome is a finished re-check of the watch started as watchSeq.
type checkOutcome struct {
	watchSeq uint64
	read     ownerKeyRead
	err      error
}

// roundOutcome is a finished round, tagged with the generation it
// started in: a result that etcd has overtaken is dropped.
type roundOutcome struct {
	gen    uint64
	server Server
	ok     bool
}

// run is the discovery goroutine.
func (d *Discovery) run(st startState) {
	l := &loop{
		d:         d,
		rounds:    make(chan roundOutcome, 1),
		resyncs:   make(chan resyncOutcome, 1),
		checks:    make(chan checkOutcome, 1),
		stopWatch: func() {},
	}
	defer func() { l.stopWatch() }()
	var health <-chan time.Time
	switch {
	case d.cfg.Client == nil:
		l.polling = true
	case st.etcdOK:
		l.startResync()
	default:
		// Etcd did not answer Start: poll until it does.
		l.troubleSince, l.polling = d.cfg.clock.Now(), true
		l.scheduleResync()
	}
	if d.cfg.Client != nil {
		t := time.NewTicker(max(min(d.cfg.EtcdGrace/3, time.Second), time.Millisecond))
		defer t.Stop()
		health = t.C
	}
	l.interval = d.cfg.clock.After(d.cfg.Interval)
	for {
		select {
		case <-d.ctx.Done():
			return
		case resp, ok := <-l.watchCh:
			if !ok || resp.Err() != nil {
				d.logger.Debug("owner watch broke; watching again", "error", resp.Err())
				l.leaveWatch()
				l.troubled()
				l.scheduleResync()
				continue
			}
			l.apply(resp.Events)
		case out := <-l.resyncs:
			l.resynced(out)
		case <-l.resyncAt:
			l.resyncAt = nil
			if l.connHealthy() {
				l.startResync()
			} else {
				l.resyncTries++ // not worth a request: try later
				l.scheduleResync()
			}
		case c := <-l.checks:
			l.checked(c)
		case out := <-l.rounds:
			l.finished(out)
		case <-l.askAt:
			l.askAt = nil
			if l.searching {
				l.startRound()
			}
		case <-l.interval:
			l.interval = d.cfg.clock.After(d.cfg.Interval)
			l.startCheck()
			if l.polling || l.searching {
				l.startRound()
			}
		case addr := <-d.reports:
			l.report(addr)
		case <-l.roundAt:
			l.roundAt = nil
			l.startRound()
		case <-health:
			l.checkHealth()
		}
	}
}

// jittered returns a random pause in [d/2, 3d/2).
func jittered(d time.Duration) time.Duration {
	if d <= 1 {
		return d
	}
	return d/2 + rand.N(d)
}

func (l *loop) leaveWatch() {
	l.stopWatch()
	l.stopWatch = func() {}
	l.watchCh = nil
	l.d.metrics.setWatching(false)
}

// troubled notes that etcd failed the worker, if it had not already.
func (l *loop) troubled() {
	if l.troubleSince.IsZero() {
		l.troubleSince = l.d.cfg.clock.Now()
	}
}

// scheduleResync plans the next attempt to watch again: the first within
// Jitter, later ones backing off up to resyncPauseMax.
func (l *loop) scheduleResync() {
	if l.watchCh != nil || l.resyncing || l.resyncAt != nil {
		return
	}
	pause := time.Duration(rand.Int64N(int64(l.d.cfg.Jitter)))
	if l.resyncTries > 0 {
		pause = backoff.Jittered(l.resyncTries-1, resyncPauseMin, resyncPauseMax)
	}
	l.resyncAt = l.d.cfg.clock.After(pause)
}

// startResync starts, in its own goroutine, a watch of the owner key,
// waits until etcd has created it, then reads the key (resolving the app
// first if that is still to do: an app registered after a lazy Start, or
// etcd unreachable then). A watch started from the current revision is
// "synced" in etcd from the first moment and gets events as they are
// written; events the read already reflects are skipped (skipUpTo).
func (l *loop) startResync() {
	if l.watchCh != nil || l.resyncing {
		return
	}
	l.resyncing = true
	d := l.d
	d.wg.Go(func() { l.resyncs <- d.resync() })
}

// resync watches the owner key and reads it. Every watch shares the
// etcd client's one require-leader stream: a watch on a stream of its own
// would stay in the client, with its goroutine, until the client closes
// if the connection broke before etcd created it. A stream that stalls
// with its connection recovers when gRPC's keepalive resets the
// connection (about 12 s with coord.ClientConfig); meanwhile, and for
// good with a client built without keepalive, the worker polls.
func (d *Discovery) resync() resyncOutcome {
	if err := d.resolveAppInEtcd(d.ctx); err != nil {
		return resyncOutcome{err: err}
	}
	ctx, cancel := context.WithCancel(clientv3.WithRequireLeader(d.ctx))
	// Watch itself blocks while the client's stream cannot take the
	// request (a dead connection): cancelling ctx is what bounds it.
	giveUp := time.AfterFunc(d.cfg.RequestTimeout, cancel)
	wch := d.cfg.Client.Watch(ctx, d.keys.Owner(d.AppID()), clientv3.WithCreatedNotify())
	var err error
	select {
	case resp, ok := <-wch:
		switch {
		case !ok:
			err = errors.New("worker: watch closed before it was created")
		case resp.Err() != nil:
			err = resp.Err()
		case !resp.Created:
			err = errors.New("worker: watch not created")
		}
	case <-ctx.Done():
		err = ctx.Err()
	}
	if !giveUp.Stop() && err == nil {
		err = context.DeadlineExceeded // the timeout won the race: ctx is cancelled
	}
	if err != nil {
		cancel()
		return resyncOutcome{err: err}
	}
	r, err := d.readOwnerKey(d.ctx)
	if err != nil {
		cancel()
		return resyncOutcome{err: err}
	}
	return resyncOutcome{watch: wch, cancel: cancel, read: r}
}

// resynced installs a new watch, or plans the next attempt.
func (l *loop) resynced(out resyncOutcome) {
	d := l.d
	l.resyncing = false
	if out.err != nil {
		if d.ctx.Err() != nil {
			return
		}
		l.resyncTries++
		if errors.Is(out.err, coord.ErrUnknownApp) {
			d.logger.Debug("app not registered yet", "error", out.err)
		} else {
			d.logger.Debug("could not watch the owner key", "error", out.err, "tries", l.resyncTries)
			l.troubled()
		}
		l.scheduleResync()
		return
	}
	if wasPolling := l.polling; wasPolling || !l.troubleSince.IsZero() {
		d.logger.Info("etcd serves again; watching the owner key", "polled", wasPolling)
	}
	l.troubleSince, l.polling, l.resyncTries = time.Time{}, false, 0
	l.watchSeq++
	l.gen++
	l.skipUpTo = out.read.rev
	l.known = keyState{rev: out.read.rev, modRev: out.read.modRev}
	l.stopWatch, l.watchCh = out.cancel, out.watch
	d.metrics.setWatching(true)
	if out.read.owner.Address != "" {
		d.setCurrent(out.read.owner)
		l.found()
	} else {
		// No owner: the same as seeing its key deleted.
		l.lookSoon()
	}
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
		l.known = keyState{rev: ev.Kv.ModRevision}
		if ev.Type == clientv3.EventTypePut {
			l.known.modRev = ev.Kv.ModRevision
			rec, err := coord.DecodeOwnerRecord(ev.Kv.Value)
			if s, ok := d.serverFromRecord(rec, ev.Kv.ModRevision); err == nil && ok {
				d.setCurrent(s)
				l.found()
				continue
			}
			d.logger.Warn("owner record unusable; asking the servers", "error", err)
		}
		l.lookSoon()
	}
}

// lookSoon starts searching for an owner: the one that left has a
// successor electing itself right now, and its put usually arrives
// within milliseconds. Give it a jittered moment (Jitter) before asking
// over HTTP, so that a thousand workers of one app do not all hit the
// successor (and etcd) at the instant it is busiest. A put ends the
// search; a round already planned stays as it is.
func (l *loop) lookSoon() {
	l.searching = true
	if l.askAt == nil {
		l.askAt = l.d.cfg.clock.After(jittered(l.d.cfg.Jitter))
	}
}

// startCheck re-reads the owner key, in its own goroutine, while
// watching: a watch can stall silently (a half-open connection, a plain
// client without gRPC keepalive), and nothing else would notice.
func (l *loop) startCheck() {
	if l.watchCh == nil || l.checking {
		return
	}
	l.checking = true
	d, seq := l.d, l.watchSeq
	d.wg.Go(func() {
		r, err := d.readOwnerKey(d.ctx)
		l.checks <- checkOutcome{watchSeq: seq, read: r, err: err}
	})
}

// checked compares a re-check with what the watch has shown. The read is
// linearizable: if it is newer than the last event and shows another key,
// the watch missed it (or the event is a moment late); either way a fresh
// watch and read put the worker right. A failed read means etcd does not
// serve this worker: it tries to watch again, and polls after EtcdGrace.
func (l *loop) checked(c checkOutcome) {
	d := l.d
	l.checking = false
	if l.watchCh == nil || c.watchSeq != l.watchSeq || d.ctx.Err() != nil {
		return
	}
	if c.err != nil {
		d.logger.Warn("etcd did not answer the owner key's re-check; watching again", "error", c.err)
		l.leaveWatch()
		l.troubled()
		l.scheduleResync()
		return
	}
	if c.read.rev > l.known.rev && c.read.modRev != l.known.modRev {
		d.logger.Warn("the owner key changed without the watch showing it; watching again",
			"watched_mod_revision", l.known.modRev, "read_mod_revision", c.read.modRev)
		l.leaveWatch()
		l.startResync()
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

// report starts a round for the worker's own failed traffic to addr, if
// addr is the current server. Reports of the same address in a row back
// off (from TryPause up to Interval): a worker whose every request fails
// must not turn each failure into a round.
func (l *loop) report(addr string) {
	d := l.d
	if cur, ok := d.Current(); !ok || cur.Address != addr {
		return
	}
	if addr != l.reported {
		l.reported, l.reportTries, l.reportOK = addr, 0, time.Time{}
	}
	if l.roundAt != nil {
		return // a round is planned already
	}
	now := d.cfg.clock.Now()
	pause := l.reportOK.Sub(now)
	l.reportOK = now.Add(max(pause, 0) + backoff.Jittered(l.reportTries, d.cfg.TryPause, d.cfg.Interval))
	l.reportTries++
	if pause <= 0 {
		l.startRound()
		return
	}
	l.roundAt = d.cfg.clock.After(pause)
}

// finished takes a round's result. Unless the worker polls, etcd alone
// says who the owner is: the round has made the server asked elect an
// owner if there was none, and that owner's put arrives on the watch (or
// in the read that starts the next one); an HTTP answer — a deposed
// owner's stale table, say — never overrides it. While polling (etcd has
// failed the worker for EtcdGrace), the answer is the server. A failed round counts towards
// isolation, and the MaxFailedRounds-th in a row calls OnIsolated.
func (l *loop) finished(out roundOutcome) {
	d := l.d
	l.roundRunning = false
	if d.ctx.Err() != nil {
		return
	}
	// Counted once handled: whoever sees the count sees its effects
	// (OnIsolated included).
	defer d.metrics.round(out.ok)
	if out.ok {
		l.failed = 0
		if l.polling && out.gen == l.gen {
			if cur, _ := d.Current(); cur.Address != out.server.Address {
				d.setCurrent(out.server) // the same address keeps what etcd said of it
			}
			l.searching = false
		}
		return
	}
	if out.gen != l.gen {
		// Overtaken: etcd has shown a change since the round started.
		if l.searching {
			l.lookSoon()
		}
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

// found ends the search and resets the isolation count.
func (l *loop) found() {
	l.searching = false
	l.failed = 0
}

// checkHealth follows the etcd connection's state. While watching, a
// connection not ready for EtcdGrace means polling; while not, trouble
// that has lasted EtcdGrace does. Polling starts at a random phase of the
// Interval, as PowerJob workers' rounds fall: workers started together
// and cut off together must not poll in lockstep. The worker keeps its
// server meanwhile; nothing says it has changed.
func (l *loop) checkHealth() {
	d := l.d
	now := d.cfg.clock.Now()
	if l.watchCh != nil {
		if l.connHealthy() {
			l.troubleSince = time.Time{}
			return
		}
		l.troubled()
	}
	if l.polling || l.troubleSince.IsZero() || now.Sub(l.troubleSince) < d.cfg.EtcdGrace {
		return
	}
	d.logger.Warn("etcd unreachable; polling the servers", "for", now.Sub(l.troubleSince))
	l.leaveWatch()
	l.scheduleResync()
	l.polling = true
	l.interval = d.cfg.clock.After(time.Duration(rand.Int64N(int64(d.cfg.Interval))))
}

func (l *loop) connHealthy() bool { return l.d.etcdConnected() }

// etcdConnected reports whether the etcd client's connection is up (or
// idle, to be dialled on the next request).
func (d *Discovery) etcdConnected() bool {
	switch d.cfg.Client.ActiveConnection().GetState() {
	case connectivity.Ready, connectivity.Idle:
		return true
	}
	return false
}
