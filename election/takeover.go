package election

import (
	"context"
	"slices"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
)

// takeoverQueue holds the apps this server should take over as successor:
// their owner key was deleted, so their previous owner has provably
// stopped (its lease expired after its guard fired, or it resigned), and
// this server ranks first for them among the live servers other than that
// owner. Apps stay listed as orphans until someone owns them, so that a
// membership change can hand them to a new successor.
type takeoverQueue struct {
	pending []int64
	queued  map[int64]bool   // apps in pending
	orphans map[int64]orphan // apps whose owner key is gone, until owned
	signal  chan struct{}    // capacity 1; a value means "look at pending"
}

// orphanSettle is how long after an owner key's deletion its previous
// owner is passed over as successor; orphanAnyone is how long the
// successor has before every server that knows of the orphan elects
// itself for it.
const (
	orphanSettle = time.Second
	orphanAnyone = 2 * time.Second
)

type orphan struct {
	prevOwner string
	since     time.Time // when the deletion was seen
}

func (q *takeoverQueue) init() {
	q.queued = map[int64]bool{}
	q.orphans = map[int64]orphan{}
	q.signal = make(chan struct{}, 1)
}

func (q *takeoverQueue) wake() {
	select {
	case q.signal <- struct{}{}:
	default:
	}
}

// considerTakeover queues app if this server is its successor. Called
// with e.mu held.
func (e *Elector) considerTakeover(app int64, prevOwner string) {
	if e.draining || e.closed {
		return
	}
	if _, owned := e.table[app]; owned {
		delete(e.takeover.orphans, app)
		return
	}
	o, ok := e.takeover.orphans[app]
	if !ok {
		o = orphan{prevOwner: prevOwner, since: time.Now()}
		e.takeover.orphans[app] = o
	}
	// The owner that just left is passed over while its membership key
	// may still be listed. Past that moment the live set alone decides:
	// servers can disagree about who the previous owner was (one whose
	// watch missed an overwrite while it was paused names itself), and
	// with different exclusions each could leave the app to another.
	exclude := o.prevOwner
	if time.Since(o.since) > orphanSettle {
		exclude = ""
	}
	// An orphan still unowned after orphanAnyone is taken by whoever
	// knows of it: its successor may be a server that started after the
	// deletion and so never saw it (a server learns of orphans only from
	// deletions). Concurrent elections of one app are safe: one wins.
	anyone := time.Since(o.since) > orphanAnyone
	if e.takeover.queued[app] || !anyone && e.successor(app, exclude) != e.cfg.ServerID {
		return
	}
	e.takeover.queued[app] = true
	e.takeover.pending = append(e.takeover.pending, app)
	e.takeover.wake()
}

// adopted is called when this server comes to own app: if the app was an
// orphan, that is a takeover. Called with e.mu held.
func (e *Elector) adopted(app int64) {
	if o, ok := e.takeover.orphans[app]; ok {
		delete(e.takeover.orphans, app)
		e.metrics.takeover(time.Since(o.since).Seconds())
		e.logger.Debug("took an orphaned app over", "app_id", app, "previous_owner", o.prevOwner, "gap", time.Since(o.since))
	}
}

// successor is the live server ranked first for app, not counting
// exclude (the owner that just left: its membership key may still be
// listed for a moment). Empty when there is none.
func (e *Elector) successor(app int64, exclude string) string {
	ranked := coord.RankWeighted(app, coord.Placement(e.members.Servers(), exclude))
	if len(ranked) == 0 {
		return ""
	}
	return ranked[0]
}

// takeoverLoop elects this server for queued apps; ElectionConcurrency
// of them run at once. Each takes up to takeoverBatch queued apps and
// writes them in one Txn (takeOverBatch); whatever that cannot take goes
// through a full election, one app at a time.
func (e *Elector) takeoverLoop() {
	for {
		select {
		case <-e.takeover.signal:
		case <-e.ctx.Done():
			return
		}
		for {
			e.mu.Lock()
			if len(e.takeover.pending) == 0 {
				e.mu.Unlock()
				break
			}
			n := min(takeoverBatch, len(e.takeover.pending))
			apps := slices.Clone(e.takeover.pending[:n])
			e.takeover.pending = e.takeover.pending[n:]
			for _, app := range apps {
				delete(e.takeover.queued, app)
			}
			if len(e.takeover.pending) > 0 {
				e.takeover.wake() // let another loop help
			}
			e.mu.Unlock()

			for _, app := range e.takeOverBatch(apps) {
				ctx, cancel := context.WithTimeout(e.ctx, e.cfg.LockTimeout+e.cfg.PingTimeout)
				o, err := e.ensureOwner(ctx, app, false)
				cancel()
				if err != nil {
					e.logger.Info("successor takeover failed; workers will ask", "app_id", app, "error", err)
				} else if o.serverID != e.cfg.ServerID {
					e.logger.Debug("another server took the app first", "app_id", app, "owner", o.serverID)
				}
			}
		}
	}
}

// takeoverBatch is how many orphans one Txn takes over; etcd refuses a
// Txn of more than 128 operations by default.
const takeoverBatch = 64

// takeOverBatch elects this server, in one Txn, for orphans whose owner
// key this server's table shows deleted, and returns the apps it left for
// a full election: one that is no orphan any more, that this server is
// resigning, or that has an election in flight here; or all of them, when
// the Txn cannot be written or fails. A single app is always left.
//
// The Txn puts each owner key, bound to this server's lease, only if it
// still does not exist (ModRevision 0) — the very compare an election
// makes, under the app's mutex, after reading the key absent. The mutex
// does not make elections exclusive, the compare does: it queues the
// contenders for one app so that they do not all retry. An election
// racing this Txn fails its compare and, retrying, finds this server's
// live key; this Txn, racing an election that wrote first, fails as a
// whole and its apps go through elections of their own. Displacement
// markers hold the new ownerships back exactly as after an election.
func (e *Elector) takeOverBatch(apps []int64) (left []int64) {
	if len(apps) < 2 || e.session.Check() != nil {
		return apps
	}
	var batch []int64
	e.mu.Lock()
	for _, app := range apps {
		_, owned := e.table[app]
		_, inFlight := e.flights[app]
		if owned || inFlight || e.resigningNow(app) {
			left = append(left, app)
			continue
		}
		batch = append(batch, app)
	}
	e.mu.Unlock()
	if len(batch) < 2 {
		return apps
	}
	select {
	case e.slots <- struct{}{}:
		defer func() { <-e.slots }()
	case <-e.ctx.Done():
		return apps
	}
	val, err := coord.OwnerRecord{
		ServerID:   e.cfg.ServerID,
		Control:    e.cfg.Control,
		Protocols:  e.cfg.Protocols,
		TTLMillis:  e.session.TTL().Milliseconds(),
		AcquiredAt: time.Now().UTC(),
	}.Encode()
	if err != nil {
		return apps
	}
	lease := e.session.Lease()
	cmps := make([]clientv3.Cmp, 0, len(batch))
	ops := make([]clientv3.Op, 0, len(batch))
	for _, app := range batch {
		key := e.keys.Owner(app)
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(key), "=", 0))
		ops = append(ops, clientv3.OpPut(key, string(val), clientv3.WithLease(lease)))
	}
	ctx, cancel := context.WithTimeout(e.ctx, e.cfg.LockTimeout)
	defer cancel()
	resp, err := e.cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
	if err != nil || !resp.Succeeded {
		// A lost response is retried by the elections: each reads its
		// key and finds this server's own under its lease if the Txn
		// was applied after all.
		e.logger.Debug("batch takeover not written; electing one by one", "apps", len(batch), "error", err)
		return apps
	}
	e.mu.Lock()
	for _, app := range batch {
		e.tryActivate(e.own(app, resp.Header.Revision, lease))
		e.metrics.election("won")
	}
	e.mu.Unlock()
	e.logger.Debug("took orphans over in one Txn", "apps", len(batch), "token", resp.Header.Revision)
	return left
}

// membersLoop pays the releases this server owes (see release.go) and
// reconsiders orphaned apps whenever the live-server set changes — a successor that died before taking its apps over is replaced
// by the next one — and once a second while orphans are left, so that a
// takeover that failed (this server was not confirmed yet, say right
// after etcd came back) is tried again. It touches etcd only when there is
// an orphan this server should take.
func (e *Elector) membersLoop() {
	changed := e.members.Changed()
	sweep := time.NewTicker(time.Second)
	defer sweep.Stop()
	for {
		select {
		case <-changed:
		case <-sweep.C:
		case <-e.ctx.Done():
			return
		}
		changed = e.members.Changed() // before reading: no change slips by
		e.reconsiderOrphans()
		e.payDebts()
	}
}

// reconsiderOrphans queues every orphan this server is now successor of.
func (e *Elector) reconsiderOrphans() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for app, o := range e.takeover.orphans {
		e.considerTakeover(app, o.prevOwner)
	}
}

// Successor returns the live server that takes app over if its current
// owner leaves: the first by coord.RankWeighted among the live servers other than
// the owner this server's table shows. Workers that see the owner key
// deleted make the same choice over the same set.
func (e *Elector) Successor(app int64) (coord.ServerRecord, bool) {
	if e == nil {
		return coord.ServerRecord{}, false
	}
	e.mu.Lock()
	current := e.table[app].rec.ServerID
	e.mu.Unlock()
	return e.members.Get(e.successor(app, current))
}
