package election

import (
	"context"
	"errors"
	"fmt"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/backoff"
)

// Displacement markers carry the obligation to wait out a displaced owner
// in etcd instead of in one server's memory. An election that overwrites
// an owner key whose lease is alive (its owner did not answer a ping)
// writes, in the same Txn, {p}/displaced/{appId}/{leaseHex} bound to the
// displaced owner's lease. No server acts for an app while any marker for
// it exists (mayAct). The displaced owner deletes its marker once its
// watch has shown the overwrite and the ownership is over; if it cannot,
// the marker goes when etcd expires its lease, which its guard makes
// happen only after it stopped acting. So whoever comes next — the
// server that wrote the marker, a successor after that server crashed,
// a server that restarted — waits exactly as long as it must.

// markerPut records a marker seen in the table. Called with e.mu held.
func (e *Elector) markerPut(app int64, lease clientv3.LeaseID, modRev int64) {
	if e.markers[app] == nil {
		e.markers[app] = map[clientv3.LeaseID]int64{}
	}
	e.markers[app][lease] = modRev
}

// markerGone records that a marker was deleted (by its owner, or with its
// lease). Called with e.mu held.
func (e *Elector) markerGone(app int64, lease clientv3.LeaseID) {
	delete(e.markers[app], lease)
	if len(e.markers[app]) == 0 {
		delete(e.markers, app)
	}
	delete(e.ownMarkers[app], lease)
	if len(e.ownMarkers[app]) == 0 {
		delete(e.ownMarkers, app)
	}
}

// queueOwnMarkers queues for deletion every marker of the apps in touched
// (nil: of any app) that is bound to this server's lease. Such a marker
// was written in the same Txn as an overwrite of this server's owner key;
// the table holds that overwrite too, so the ownership it ended has been
// lost and its context cancelled before this runs. Called with e.mu held,
// after a batch.
func (e *Elector) queueOwnMarkers(touched map[int64]bool) {
	lease := e.session.Lease()
	queued := false
	for app, leases := range e.markers {
		if touched != nil && !touched[app] {
			continue
		}
		rev, ok := leases[lease]
		if !ok || e.ownMarkers[app][lease] == rev {
			continue
		}
		if o := e.mine[app]; o != nil && o.active && o.token < rev {
			// Cannot happen: the overwrite at rev ended it. Keep the
			// marker rather than trust a table that disagrees with itself.
			e.logger.Error("a marker displaces an ownership this server still acts for; keeping the marker", "app_id", app, "token", o.token)
			continue
		}
		if e.ownMarkers[app] == nil {
			e.ownMarkers[app] = map[clientv3.LeaseID]int64{}
		}
		e.ownMarkers[app][lease] = rev
		queued = true
	}
	if queued {
		select {
		case e.sweep <- struct{}{}:
		default:
		}
	}
}

// markerLoop deletes the queued markers of this server's ended
// ownerships, each only if it is still the one the table showed, and
// retries after a pause while etcd does not answer.
func (e *Elector) markerLoop() {
	for {
		select {
		case <-e.sweep:
		case <-e.ctx.Done():
			return
		}
		for attempt := 0; ; attempt++ {
			e.mu.Lock()
			keys := map[string]int64{}
			for app, leases := range e.ownMarkers {
				for lease, rev := range leases {
					keys[e.keys.DisplacedMarker(app, int64(lease))] = rev
				}
			}
			e.mu.Unlock()
			if len(keys) == 0 {
				break
			}
			ctx, cancel := context.WithTimeout(e.ctx, e.session.TTL())
			err := e.deleteFenced(ctx, keys)
			cancel()
			if err == nil {
				e.forgetOwnMarkers(keys)
				break
			}
			e.logger.Debug("deleting displacement markers failed, retrying", "markers", len(keys), "error", err)
			if backoff.Sleep(e.ctx, backoff.Jittered(attempt, 50*time.Millisecond, time.Second)) != nil {
				return
			}
		}
	}
}

// forgetOwnMarkers drops deleted markers from the queue (the watch removes
// them from the table when it shows the deletion).
func (e *Elector) forgetOwnMarkers(keys map[string]int64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for key, rev := range keys {
		app, lease, err := e.keys.ParseDisplacedMarker(key)
		if err != nil {
			continue
		}
		if e.ownMarkers[app][clientv3.LeaseID(lease)] == rev {
			delete(e.ownMarkers[app], clientv3.LeaseID(lease))
			if len(e.ownMarkers[app]) == 0 {
				delete(e.ownMarkers, app)
			}
		}
	}
}

// markerOp is the put of the marker that an overwrite of app's owner key
// — held by server (empty if its record could not be decoded) under lease
// at revision token — must write in the same Txn.
func (e *Elector) markerOp(app int64, server string, lease clientv3.LeaseID, token int64) (clientv3.Op, error) {
	val, err := coord.DisplacedRecord{ServerID: server, Token: token}.Encode()
	if err != nil {
		return clientv3.Op{}, err
	}
	return clientv3.OpPut(e.keys.DisplacedMarker(app, int64(lease)), string(val), clientv3.WithLease(lease)), nil
}

// deleteFenced deletes keys (key → ModRevision), each only if its
// ModRevision is still the one given; batches of up to 64 go in one Txn,
// and a batch whose guard fails is retried key by key. A key that changed
// or is gone is not an error.
func (e *Elector) deleteFenced(ctx context.Context, keys map[string]int64) error {
	const batch = 64
	all := make([]string, 0, len(keys))
	for k := range keys {
		all = append(all, k)
	}
	var errs []error
	for len(all) > 0 {
		chunk := all[:min(batch, len(all))]
		all = all[len(chunk):]
		var cmps []clientv3.Cmp
		var ops []clientv3.Op
		for _, key := range chunk {
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(key), "=", keys[key]))
			ops = append(ops, clientv3.OpDelete(key))
		}
		resp, err := e.cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
		if err != nil {
			errs = append(errs, fmt.Errorf("election: delete: %w", err))
			continue
		}
		if resp.Succeeded || len(chunk) == 1 {
			continue
		}
		for _, key := range chunk {
			if err := e.deleteFenced(ctx, map[string]int64{key: keys[key]}); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}
