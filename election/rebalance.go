package election

import (
	"context"
	"errors"
	"maps"
	"slices"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/backoff"
)

// With Config.Rebalance, each server moves the apps it owns whose
// preferred server — the first by coord.RankWeighted over the live
// servers' placement weights, as Place chooses — is now another one:
//
//   - only once the live-server set has been unchanged for
//     RebalanceSettle, as this server sees it (coord.Members.Stable), so
//     every server it moves apps to has been a member at least that long
//     and a flapping server moves nothing;
//   - only to a server that answers a ping as itself with its guard
//     confirmed, and whose weight is positive;
//   - at most RebalanceRate of the apps it owned when the round began,
//     per second, from one token bucket that outlives rounds, and at most
//     64 apps to a Txn;
//   - with the transfer a HandOver makes (this server stops acting, then
//     writes the new owner's record over its own, bound to the new
//     owner's lease, guarded by its token), so workers see one change
//     and the new owner acts at once. The Txn also compares every
//     membership key's ModRevision with the revision this server's view
//     of the set holds: a server that joined or changed weight since
//     this server planned the move makes the move fail instead of
//     sending the app to a server that is no longer its preferred one.
//     A server that left cannot make a preferred server another one
//     (rendezvous hashing), and the target's own membership is compared.
//     A move that was not made is undone (undoMove): every key that
//     still holds its token is owned again — under that token when the
//     Txn failed, under a new one written over it when its answer was
//     lost — and the next round plans afresh.
//
// Every server computes the same preferred server from the same set, and
// a server never moves an app it prefers itself, so one change of the set
// moves each app at most once.

// rebalanceTick is how often a round moves its next apps: the rate's
// budget is spread over the second, so workers see a trickle, not a
// burst once a second.
const rebalanceTick = 100 * time.Millisecond

// moveBatch bounds the apps of one move's Txn: it holds a compare and a
// put per app, and etcd refuses a Txn of more than 128 operations by
// default.
const moveBatch = 64

// rateBucket is the rebalance rate's token bucket. It lives as long as
// the rebalance loop, across rounds, so that rounds restarted by changes
// of the set cannot move faster than the rate.
type rateBucket struct {
	tokens float64
	at     time.Time
}

// refill adds what perSecond has earned since the last refill, up to one
// app plus one tick's worth: the fraction of an app left after a tick's
// moves carries over, or a rate that is not a whole number of apps per
// tick would be rounded down.
func (b *rateBucket) refill(perSecond float64) {
	now := time.Now()
	burst := 1 + perSecond*rebalanceTick.Seconds()
	b.tokens = min(burst, b.tokens+perSecond*now.Sub(b.at).Seconds())
	b.at = now
}

// rebalanceLoop waits for the live-server set to settle, then runs rounds
// until nothing is left to move; it starts again at every change.
func (e *Elector) rebalanceLoop() {
	bucket := &rateBucket{tokens: 1, at: time.Now()} // one app may move at once; then the rate
	for {
		changed := e.members.Changed()
		since, _ := e.members.Stable()
		wait := e.cfg.RebalanceSettle - time.Since(since)
		if wait <= 0 {
			if e.rebalanceRound(bucket) {
				wait = e.cfg.RebalanceSettle // nothing left: look again now and then
			} else {
				wait = time.Second // some target was not ready, or a move was undone
			}
		}
		t := time.NewTimer(wait)
		select {
		case <-changed:
		case <-t.C:
		case <-e.ctx.Done():
			t.Stop()
			return
		}
		t.Stop()
	}
}

// roundView is the view of the live-server set a round plans on: the
// placement as of since, known up to revision rev, and the channel that
// is closed at the next change of the set.
type roundView struct {
	since   time.Time
	rev     int64
	changed <-chan struct{}
}

// current reports whether the placement is still the one the round
// planned on. A change that does not move apps (a record rewritten with
// the same weight, a re-read of the set) only advances rev.
func (v *roundView) current(e *Elector) bool {
	select {
	case <-v.changed:
	default:
		return true
	}
	changed := e.members.Changed()
	since, rev := e.members.Stable()
	if !since.Equal(v.since) {
		return false
	}
	v.rev, v.changed = rev, changed
	return true
}

// rebalanceRound moves, at the rebalance rate, the apps this server owns
// and acts for whose preferred server is another, ready one. It returns
// early when the placement changes, or the elector drains or closes; it
// reports whether every app it found to move was moved.
func (e *Elector) rebalanceRound(bucket *rateBucket) bool {
	view := roundView{changed: e.members.Changed()}
	view.since, view.rev = e.members.Stable()
	placement := coord.Placement(e.members.Servers(), "")
	weights := make(map[string]float64, len(placement))
	for _, w := range placement {
		weights[w.ID] = w.Weight
	}
	e.mu.Lock()
	if e.draining || e.closed {
		e.mu.Unlock()
		return true
	}
	owned := e.active
	plan := map[string][]int64{} // target → apps
	for app, o := range e.mine {
		if !o.active {
			continue
		}
		if to := coord.RankWeighted(app, placement)[0]; to != e.cfg.ServerID && weights[to] > 0 {
			plan[to] = append(plan[to], app)
		}
	}
	e.mu.Unlock()
	if len(plan) == 0 || !view.current(e) {
		return len(plan) == 0 // a plan older than the set is redone
	}

	perSecond := max(1, e.cfg.RebalanceRate*float64(owned))
	tick := time.NewTicker(rebalanceTick)
	defer tick.Stop()
	complete := true
	for _, to := range slices.Sorted(maps.Keys(plan)) {
		apps := plan[to]
		slices.Sort(apps)
		var pinged time.Time
		var target handoverTarget
		var err error
		for len(apps) > 0 {
			for bucket.refill(perSecond); bucket.tokens < 1; bucket.refill(perSecond) {
				select {
				case <-tick.C:
				case <-e.ctx.Done():
					return false
				}
			}
			if !view.current(e) {
				return false
			}
			if time.Since(pinged) > time.Second {
				if !e.readyForApps(to) {
					complete = false
					break
				}
				pinged = time.Now()
				// What the writes need of the target, read once a ping:
				// a lease that changed meanwhile fails the move's
				// membership compare, which undoes it.
				ctx, cancel := context.WithTimeout(e.ctx, e.session.TTL())
				target, err = e.handoverTarget(ctx, to)
				cancel()
				if err != nil {
					e.logger.Info("not rebalancing to a server whose membership cannot be read", "to", to, "error", err)
					complete = false
					break
				}
			}
			n := min(int(bucket.tokens), len(apps), moveBatch)
			bucket.tokens -= float64(n)
			if !e.move(target, apps[:n], view.rev) {
				return false
			}
			apps = apps[n:]
		}
	}
	return complete
}

// readyForApps pings server id: it must answer as itself with its guard
// confirmed.
func (e *Elector) readyForApps(id string) bool {
	rec, ok := e.members.Get(id)
	if !ok || e.cfg.Pinger == nil {
		return ok
	}
	ctx, cancel := context.WithTimeout(e.ctx, e.cfg.PingTimeout)
	defer cancel()
	reply, err := e.cfg.Pinger.Ping(ctx, id, rec.Control)
	switch {
	case err != nil:
		e.logger.Debug("not rebalancing to a server that does not answer", "server", id, "error", err)
		return false
	case reply.Unconfirmed:
		e.logger.Debug("not rebalancing to a server whose guard is unconfirmed", "server", id)
		return false
	}
	return true
}

// move hands apps to target, which the view of the live-server set at
// revision rev prefers for them. It reports false when the round should
// end: the elector is draining or closing, or the move failed (the set
// changed, or etcd failed it) and was undone.
func (e *Elector) move(target handoverTarget, apps []int64, rev int64) bool {
	ctx, cancel := context.WithTimeout(e.ctx, e.session.TTL())
	defer cancel()
	to := target.record.ServerID
	target.record.AcquiredAt = time.Now().UTC()

	e.mu.Lock()
	if e.draining || e.closed {
		e.mu.Unlock()
		return false
	}
	tokens := make(map[int64]int64, len(apps))
	until := e.cfg.clock.Now().Add(2 * e.session.TTL())
	for _, app := range apps {
		o := e.mine[app]
		if o == nil || !o.active {
			continue // lost or resigned meanwhile
		}
		tokens[app] = o.token
		e.giveUp(app, o.token, until)
		e.lose(o, ReasonRebalanced)
	}
	// A drain that starts now waits for this move before its last read
	// of the keys naming this server (passOnLate).
	e.passOns.Add(1)
	e.mu.Unlock()
	defer e.passOns.Done()
	if len(tokens) == 0 {
		return true
	}

	unchanged := clientv3.Compare(clientv3.ModRevision(e.keys.ServerPrefix()), "<", rev+1).WithPrefix()
	_, err := e.transferBatch(ctx, target, slices.Collect(maps.Keys(tokens)), tokens, unchanged)
	if err == nil {
		e.metrics.rebalanced(len(tokens))
		e.logger.Debug("rebalanced", "to", to, "apps", len(tokens))
		return true
	}
	// The Txn's outcome is known when it answered; without an answer etcd
	// may still apply it, later.
	e.logger.Info("rebalancing move not made; taking the apps back", "to", to, "apps", len(tokens), "error", err)
	e.undoMove(tokens, !errors.Is(err, errGuardFailed))
	return false
}

// undoMove takes back the apps of a move that was not made (app → the
// token of the ownership the move stopped). A key that still holds its
// token was not moved, and nobody else can have owned the app meanwhile.
//
// When the move's Txn failed, it can never apply: the
// server owns such a key again under the same token, as after a pause of
// its guard. When its outcome is unknown (no answer), etcd may still apply
// it after any read: the server then fences it off, rewriting each key
// that still holds its token with its own record, and owns the app under
// the new token — the move's Txn, comparing the old one, can only fail
// from then on. Either way a later round, planned on the view that made
// the move fail, moves the app where it belongs now. Keys that changed
// are left alone. Only if etcd cannot be reached for a whole TTL are the
// apps released the way HandOver releases them (token-fenced too).
func (e *Elector) undoMove(tokens map[int64]int64, unknown bool) {
	ctx, cancel := context.WithTimeout(e.ctx, e.session.TTL())
	defer cancel()
	left := maps.Clone(tokens)
	for attempt := 0; len(left) > 0; attempt++ {
		if attempt > 0 && backoff.Sleep(ctx, backoff.Jittered(attempt-1, 50*time.Millisecond, time.Second)) != nil {
			break
		}
		for app, token := range left {
			if e.takeBack(ctx, app, token, unknown) == nil {
				delete(left, app)
			}
		}
	}
	if len(left) == 0 || e.ctx.Err() != nil {
		return // done, or closing: the drain releases what names this server
	}
	rctx, rcancel := context.WithTimeout(e.ctx, e.session.TTL())
	defer rcancel()
	_ = e.releaseOrOwe(rctx, left) // what fails is owed and retried
}

// takeBack owns app again if its key still holds token (see undoMove); with
// fence, under a new token written over it. A key that names this server
// under its current lease at another revision is a fence of an earlier
// attempt whose answer was lost, and is owned too. It returns an error
// only when etcd did not answer.
func (e *Elector) takeBack(ctx context.Context, app, token int64, fence bool) error {
	key := e.keys.Owner(app)
	lease := e.session.Lease()
	txn := e.cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", token))
	if fence {
		// HandedOverFrom names the replaced token, as a handover back to
		// this server would: its watch must take the new key as its own
		// again, not as a key placed on an app it is resigning (which it
		// would pass on while owning it).
		val, err := coord.OwnerRecord{
			ServerID:       e.cfg.ServerID,
			Control:        e.cfg.Control,
			Protocols:      e.cfg.Protocols,
			TTLMillis:      e.session.TTL().Milliseconds(),
			AcquiredAt:     time.Now().UTC(),
			HandedOverFrom: token,
		}.Encode()
		if err != nil {
			return err
		}
		txn = txn.Then(clientv3.OpPut(key, string(val), clientv3.WithLease(lease)))
	}
	resp, err := txn.Else(clientv3.OpGet(key)).Commit()
	if err != nil {
		return err
	}
	own := func(rev int64, lease clientv3.LeaseID) {
		e.mu.Lock()
		defer e.mu.Unlock()
		delete(e.resigning, app)
		if rev == token && e.released[app] == token {
			delete(e.released, app) // the move failed: its Txn can never apply
		}
		e.tryActivate(e.own(app, rev, lease))
	}
	switch {
	case resp.Succeeded && fence:
		own(resp.Header.Revision, lease)
	case resp.Succeeded:
		own(token, lease)
	case fence:
		kvs := resp.Responses[0].GetResponseRange().Kvs
		if len(kvs) == 1 && clientv3.LeaseID(kvs[0].Lease) == lease {
			if rec, err := coord.DecodeOwnerRecord(kvs[0].Value); err == nil && rec.ServerID == e.cfg.ServerID {
				own(kvs[0].ModRevision, lease)
			}
		}
	}
	return nil
}
