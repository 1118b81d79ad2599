package election

import (
	"context"
	"maps"
	"slices"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
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
//     per second;
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
//
// Every server computes the same preferred server from the same set, and
// a server never moves an app it prefers itself, so one change of the set
// moves each app at most once.

// rebalanceTick is how often a round moves its next apps: the rate's
// budget is spread over the second, so workers see a trickle, not a
// burst once a second.
const rebalanceTick = 100 * time.Millisecond

// rebalanceLoop waits for the live-server set to settle, then runs rounds
// until nothing is left to move; it starts again at every change.
func (e *Elector) rebalanceLoop() {
	for {
		changed := e.members.Changed()
		since, _ := e.members.Stable()
		wait := e.cfg.RebalanceSettle - time.Since(since)
		if wait <= 0 {
			if e.rebalanceRound(changed) {
				wait = e.cfg.RebalanceSettle // nothing left: look again now and then
			} else {
				wait = time.Second // some target was not ready
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

// rebalanceRound moves, at the rebalance rate, the apps this server owns
// and acts for whose preferred server is another, ready one. It returns
// early when the set changes (changed is closed), the elector drains or
// closes; it reports whether every app it found to move was moved.
func (e *Elector) rebalanceRound(changed <-chan struct{}) bool {
	_, rev := e.members.Stable()
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
	plan := map[string][]int64{} // target → apps, by app id
	for app, o := range e.mine {
		if !o.active {
			continue
		}
		if to := coord.RankWeighted(app, placement)[0]; to != e.cfg.ServerID && weights[to] > 0 {
			plan[to] = append(plan[to], app)
		}
	}
	e.mu.Unlock()
	if len(plan) == 0 {
		return true
	}

	select {
	case <-changed:
		return false // the plan may be older than the set
	default:
	}

	perSecond := max(1, e.cfg.RebalanceRate*float64(owned))
	tokens := 1.0 // one app may move at once; then the rate
	tick := time.NewTicker(rebalanceTick)
	defer tick.Stop()
	complete := true
	for _, to := range slices.Sorted(maps.Keys(plan)) {
		apps := plan[to]
		slices.Sort(apps)
		var pinged time.Time
		for len(apps) > 0 {
			for tokens < 1 {
				select {
				case <-tick.C:
					tokens = min(tokens+perSecond*rebalanceTick.Seconds(), max(1, perSecond*rebalanceTick.Seconds()))
				case <-changed:
					return false
				case <-e.ctx.Done():
					return false
				}
			}
			select {
			case <-changed:
				return false
			default:
			}
			if time.Since(pinged) > time.Second {
				if !e.readyForApps(to) {
					complete = false
					break
				}
				pinged = time.Now()
			}
			n := min(int(tokens), len(apps))
			tokens -= float64(n)
			if !e.move(to, apps[:n], rev) {
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

// move hands apps to server to, which the view of the live-server set at
// revision rev prefers for them. It reports false when there is nothing
// more to do this round: the elector is draining or closing, or the set
// has changed.
func (e *Elector) move(to string, apps []int64, rev int64) bool {
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
		e.resigning[app] = until
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

	ctx, cancel := context.WithTimeout(e.ctx, e.session.TTL())
	defer cancel()
	unchanged := clientv3.Compare(clientv3.ModRevision(e.keys.ServerPrefix()), "<", rev+1).WithPrefix()
	target, err := e.handoverTarget(ctx, to)
	if err == nil {
		_, err = e.transferBatch(ctx, target, slices.Collect(maps.Keys(tokens)), tokens, unchanged)
	}
	if err == nil {
		e.metrics.rebalanced(len(tokens))
		e.logger.Debug("rebalanced", "to", to, "apps", len(tokens))
		return true
	}
	// This server has stopped acting for the apps: their keys must be
	// released all the same. Once this server's view holds whatever
	// change of the set made the move fail, they go as a HandOver's would.
	e.logger.Info("rebalancing move failed; handing the apps over instead", "to", to, "apps", len(tokens), "error", err)
	if latest, err := e.latestMembership(ctx); err == nil {
		e.awaitMembers(ctx, latest)
	}
	rctx, rcancel := context.WithTimeout(e.ctx, e.session.TTL())
	defer rcancel()
	_ = e.releaseOrOwe(rctx, tokens) // what fails is owed and retried
	_, now := e.members.Stable()
	return now == rev
}

// latestMembership returns the highest ModRevision among the membership
// keys.
func (e *Elector) latestMembership(ctx context.Context) (int64, error) {
	resp, err := e.cli.Get(ctx, e.keys.ServerPrefix(), clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return 0, err
	}
	var latest int64
	for _, kv := range resp.Kvs {
		latest = max(latest, kv.ModRevision)
	}
	return latest, nil
}

// awaitMembers waits until the view of the live-server set holds every
// change up to revision rev, or ctx ends.
func (e *Elector) awaitMembers(ctx context.Context, rev int64) {
	for {
		changed := e.members.Changed()
		if _, have := e.members.Stable(); have >= rev {
			return
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return
		}
	}
}
