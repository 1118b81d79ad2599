package server

import (
	"context"
	"errors"
	"fmt"
	"math"
	"net/http"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
)

// Cordon gives this server a placement weight of 0: balancing servers
// place no new app on it (it still takes apps when no other server can),
// and successors are chosen among the others first. It rewrites the
// membership record in place, under the same lease, and every later
// lease registers it cordoned too. The apps it owns stay until they are
// handed over (HandOver, Drain, Close). Safe for concurrent use; it
// blocks until etcd has the record or ctx ends.
func (n *Node) Cordon(ctx context.Context) error { return n.setCordoned(ctx, true) }

// Uncordon undoes Cordon.
func (n *Node) Uncordon(ctx context.Context) error { return n.setCordoned(ctx, false) }

// Cordoned reports whether the node is cordoned.
func (n *Node) Cordoned() bool { return n.cordoned.Load() }

// SetWeight changes this server's placement weight (Config.Weight) the way
// Cordon changes its cordon: in its membership record, in place. It must
// be a positive number.
func (n *Node) SetWeight(ctx context.Context, weight float64) error {
	if weight <= 0 || math.IsNaN(weight) || math.IsInf(weight, 0) {
		return fmt.Errorf("server: %w: weight (%v) must be a positive number", ErrInvalidConfig, weight)
	}
	return n.rewriteMembership(ctx, func(r *running) { r.weight.Store(math.Float64bits(weight)) })
}

func (n *Node) setCordoned(ctx context.Context, cordoned bool) error {
	return n.rewriteMembership(ctx, func(*running) { n.cordoned.Store(cordoned) })
}

// rewriteMembership applies change to the node's placement state and
// rewrites its membership record to match, one membership write at a
// time.
func (n *Node) rewriteMembership(ctx context.Context, change func(*running)) error {
	r := n.run.Load()
	if r == nil {
		return errors.New("server: not started")
	}
	unlock, err := n.lockMembership(ctx)
	if err != nil {
		return err
	}
	defer unlock()
	change(r)
	if n.stopping.Load() {
		return nil // a stopping node never rewrites its membership
	}
	rec := n.record(r)
	val, err := rec.Encode()
	if err != nil {
		return err
	}
	key, err := n.keys.Server(n.cfg.ServerID)
	if err != nil {
		return err
	}
	lease := r.session.Lease()
	// Only over this node's own key under its current lease: a new lease
	// registers the current state by itself.
	resp, err := n.cfg.Client.Txn(ctx).If(
		clientv3.Compare(clientv3.LeaseValue(key), "=", lease),
	).Then(
		clientv3.OpPut(key, string(val), clientv3.WithLease(lease)),
	).Commit()
	if err != nil {
		return fmt.Errorf("server: rewrite membership: %w", err)
	}
	if !resp.Succeeded {
		// A registration of a newer lease has not run yet (it would
		// have finished first: it holds the same lock); it will write
		// the state just set.
		n.logger.Info("membership key not under the current lease; its registration carries the change", "cordoned", rec.Cordoned, "weight", rec.Weight)
	}
	n.logger.Info("placement changed", "cordoned", rec.Cordoned, "weight", rec.Weight)
	return nil
}

// record is the node's membership record as it should be now.
func (n *Node) record(r *running) coord.ServerRecord {
	rec := r.record
	rec.Cordoned = n.cordoned.Load()
	rec.Weight = math.Float64frombits(r.weight.Load())
	return rec
}

func (n *Node) handleCordon(cordoned bool) func(http.ResponseWriter, *http.Request, *running) {
	return func(w http.ResponseWriter, r *http.Request, _ *running) {
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		if err := n.setCordoned(ctx, cordoned); err != nil {
			failed(w, err.Error())
			return
		}
		ok(w, map[string]bool{"cordoned": cordoned})
	}
}

// lockMembership takes the membership write lock, or fails when ctx ends
// first; call the returned function to release it.
func (n *Node) lockMembership(ctx context.Context) (func(), error) {
	select {
	case n.membership <- struct{}{}:
		return func() { <-n.membership }, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}
