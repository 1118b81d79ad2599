package election

import (
	"context"
	"errors"
	"fmt"
	"slices"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// ErrNoSuccessor: HandOver found no other live server to take the app.
var ErrNoSuccessor = errors.New("election: no other live server to hand over to")

// Resign gives app up: the ownership ends first (its context is
// cancelled, OnLose runs with ReasonResigned), then the owner key is
// deleted with a Txn guarded by the token, so that the app's successor
// takes it at once — a deletion proves to everyone that this server has
// stopped. For 2×TTL, or until another server owns the app, this server
// does not elect itself for it. Fails with ErrNotOwner if this server does
// not own app. If the delete fails the key stays and names this server
// until the resignation period ends; call Resign again.
func (e *Elector) Resign(ctx context.Context, app int64) error {
	token, err := e.stopOwning(app)
	if err != nil {
		return err
	}
	return e.deleteOwnerKeys(ctx, map[int64]int64{app: token})
}

// stopOwning ends this server's ownership of app and marks it resigning.
func (e *Elector) stopOwning(app int64) (int64, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	o := e.mine[app]
	if o == nil {
		return 0, fmt.Errorf("%w: app %d", ErrNotOwner, app)
	}
	e.resigning[app] = e.cfg.Clock.Now().Add(2 * e.session.TTL())
	e.lose(o, ReasonResigned)
	return o.token, nil
}

// deleteOwnerKeys deletes owner keys (app → token), each only if it still
// holds that token; batches of up to 64 go in one Txn, and a batch whose
// guard fails is retried key by key.
func (e *Elector) deleteOwnerKeys(ctx context.Context, tokens map[int64]int64) error {
	const batch = 64
	var apps []int64
	for app := range tokens {
		apps = append(apps, app)
	}
	var errs []error
	for len(apps) > 0 {
		n := min(batch, len(apps))
		chunk := apps[:n]
		apps = apps[n:]
		var cmps []clientv3.Cmp
		var ops []clientv3.Op
		for _, app := range chunk {
			key := e.keys.Owner(app)
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(key), "=", tokens[app]))
			ops = append(ops, clientv3.OpDelete(key))
		}
		resp, err := e.cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
		if err != nil {
			errs = append(errs, fmt.Errorf("election: delete owner keys: %w", err))
			continue
		}
		if resp.Succeeded || len(chunk) == 1 {
			continue
		}
		for _, app := range chunk {
			if err := e.deleteOwnerKeys(ctx, map[int64]int64{app: tokens[app]}); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// HandOver resigns app so that its successor takes it, and returns once
// another server owns it (the successor, normally), with that server's
// id. Fails with ErrNoSuccessor, without resigning, when no other server
// is alive; returns ctx.Err() if the new owner does not appear in time.
func (e *Elector) HandOver(ctx context.Context, app int64) (string, error) {
	if e.successor(app, e.cfg.ServerID) == "" {
		return "", fmt.Errorf("%w: app %d", ErrNoSuccessor, app)
	}
	if err := e.Resign(ctx, app); err != nil {
		return "", err
	}
	owners, err := e.waitForOthers(ctx, []int64{app})
	return owners[app], err
}

// waitForOthers waits until every app in apps is owned by another server
// and returns who owns each.
func (e *Elector) waitForOthers(ctx context.Context, apps []int64) (map[int64]string, error) {
	owners := make(map[int64]string, len(apps))
	waiting := slices.Clone(apps)
	for {
		e.mu.Lock()
		waiting = slices.DeleteFunc(waiting, func(app int64) bool {
			k, ok := e.table[app]
			if ok && k.rec.ServerID != e.cfg.ServerID && k.rec.ServerID != "" {
				owners[app] = k.rec.ServerID
				return true
			}
			return false
		})
		changed := e.changed
		e.mu.Unlock()
		if len(waiting) == 0 {
			return owners, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return owners, fmt.Errorf("election: %d of %d apps handed over: %w", len(owners), len(apps), ctx.Err())
		}
	}
}

// handOverAll resigns every app this server owns (Close's drain) and waits
// until other servers own them, unless no other server is alive.
func (e *Elector) handOverAll(ctx context.Context) error {
	e.mu.Lock()
	tokens := make(map[int64]int64, len(e.mine))
	until := e.cfg.Clock.Now().Add(2 * e.session.TTL())
	for app, o := range e.mine {
		tokens[app] = o.token
		e.resigning[app] = until
		e.lose(o, ReasonResigned)
	}
	e.mu.Unlock()
	if len(tokens) == 0 {
		return nil
	}
	if err := e.deleteOwnerKeys(ctx, tokens); err != nil {
		return err
	}
	if e.successor(0, e.cfg.ServerID) == "" {
		return nil // nobody to hand over to; the keys are gone, workers will ask
	}
	apps := make([]int64, 0, len(tokens))
	for app := range tokens {
		apps = append(apps, app)
	}
	_, err := e.waitForOthers(ctx, apps)
	return err
}

// handingOver reports whether this server is giving app away; if so it
// returns the server workers should be sent to instead (the successor
// among the others), so that this server never elects itself back.
func (e *Elector) handingOver(app int64) (owner, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	until, ok := e.resigning[app]
	if !e.draining && (!ok || !e.cfg.Clock.Now().Before(until)) {
		delete(e.resigning, app)
		return owner{}, false
	}
	id := e.successor(app, e.cfg.ServerID)
	rec, ok := e.members.Get(id)
	if !ok {
		return owner{}, false
	}
	return owner{serverID: id, protocols: rec.Protocols}, true
}

// resigningNow reports whether app is in its resignation period. Called
// with e.mu held.
func (e *Elector) resigningNow(app int64) bool {
	until, ok := e.resigning[app]
	return e.draining || ok && e.cfg.Clock.Now().Before(until)
}
