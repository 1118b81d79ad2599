package election

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
)

// ErrNoSuccessor: HandOver found no other live server to take the app.
var ErrNoSuccessor = errors.New("election: no other live server to hand over to")

// Resign gives app up: the ownership ends first (its context is
// cancelled, OnLose runs with ReasonResigned), then the owner key is
// deleted with a Txn guarded by the token, so that the app's successor
// takes it at once — a deletion proves to everyone that this server has
// stopped (and any displacement marker still left from this server's own
// takeover of the app holds the successor back as it held this server).
// Resign works on a pending ownership too. For 2×TTL, or until another server owns the app, this server
// does not elect itself for it. Fails with ErrNotOwner if this server does
// not own app. If the delete fails Resign returns the error and keeps
// retrying it in the background, once a second, until it succeeds or the
// key changes; meanwhile this server does not own the app again.
func (e *Elector) Resign(ctx context.Context, app int64) error {
	if e == nil {
		return errNotStarted
	}
	token, err := e.stopOwning(app)
	if err != nil {
		return err
	}
	if err := e.deleteOwnerKeys(ctx, map[int64]int64{app: token}); err != nil {
		e.mu.Lock()
		e.owe(map[int64]int64{app: token})
		e.mu.Unlock()
		return err
	}
	return nil
}

// stopOwning ends this server's ownership of app and marks it resigning.
// It returns the ownership's token.
func (e *Elector) stopOwning(app int64) (int64, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	o := e.mine[app]
	if o == nil {
		return 0, fmt.Errorf("%w: app %d", ErrNotOwner, app)
	}
	e.giveUp(app, o.token, e.cfg.clock.Now().Add(2*e.session.TTL()))
	e.lose(o, ReasonResigned)
	return o.token, nil
}

// deleteOwnerKeys deletes owner keys (app → token), each only if it still
// holds that token.
func (e *Elector) deleteOwnerKeys(ctx context.Context, tokens map[int64]int64) error {
	keys := make(map[string]int64, len(tokens))
	for app, token := range tokens {
		keys[e.keys.Owner(app)] = token
	}
	return e.deleteFenced(ctx, keys)
}

// HandOver gives app to its successor and returns once another server
// owns it (the successor, normally), with that server's id. This server
// stops acting first, then writes the successor's owner record over its
// own (see transfer), so workers see one change; if that write fails the
// key is deleted instead, as Resign does, and the successor takes the
// app over from the deletion. Fails with ErrNoSuccessor, without
// resigning, when no other server is alive; returns ctx.Err() if the new
// owner does not appear in time.
func (e *Elector) HandOver(ctx context.Context, app int64) (string, error) {
	if e == nil {
		return "", errNotStarted
	}
	if e.successor(app, e.cfg.ServerID) == "" {
		return "", fmt.Errorf("%w: app %d", ErrNoSuccessor, app)
	}
	token, err := e.stopOwning(app)
	if err != nil {
		return "", err
	}
	if err := e.releaseOrOwe(ctx, map[int64]int64{app: token}); err != nil {
		return "", err
	}
	owners, err := e.waitForOthers(ctx, map[int64]int64{app: token})
	return owners[app], err
}

// transferOrDelete transfers the apps (app → token of this server's
// stopped ownership) to their successors and deletes the keys of those it
// could not transfer.
func (e *Elector) transferOrDelete(ctx context.Context, tokens map[int64]int64) error {
	left := e.transfer(ctx, tokens)
	if len(left) == 0 {
		return nil
	}
	return e.deleteOwnerKeys(ctx, left)
}

// transfer writes, for each app (app → token of an ownership this server
// has already stopped), its successor's owner record over this server's,
// bound to the successor's lease, guarded by the token, with
// HandedOverFrom set to the token: the successor sees its own record
// appear and acts at once (the writer has provably stopped; markers left
// from an earlier displacement still hold it back), and workers
// see a single change of owner instead of a deletion followed by a new
// owner. Batches of up to 64 apps per successor go in one Txn. It returns
// the apps it could not transfer: no other live server, the successor's
// lease gone, or the key no longer holding the token.
func (e *Elector) transfer(ctx context.Context, tokens map[int64]int64) map[int64]int64 {
	left := map[int64]int64{}
	bySuccessor := map[string][]int64{}
	for app, token := range tokens {
		id := e.successor(app, e.cfg.ServerID)
		if id == "" {
			e.logger.Debug("no successor to hand over to; deleting the key instead", "app_id", app)
			left[app] = token
			continue
		}
		bySuccessor[id] = append(bySuccessor[id], app)
	}
	for id, apps := range bySuccessor {
		to, err := e.handoverTarget(ctx, id)
		if err != nil {
			e.logger.Info("cannot hand over to the successor; deleting the keys instead", "successor", id, "apps", len(apps), "error", err)
			for _, app := range apps {
				left[app] = tokens[app]
			}
			continue
		}
		const batch = 64
		for len(apps) > 0 {
			chunk := apps[:min(batch, len(apps))]
			apps = apps[len(chunk):]
			if _, err := e.transferBatch(ctx, to, chunk, tokens); err == nil {
				e.logger.Debug("handed over", "successor", id, "apps", len(chunk))
				continue
			} else if len(chunk) == 1 {
				e.logger.Debug("handover write failed; deleting the key instead", "app_id", chunk[0], "successor", id, "error", err)
				left[chunk[0]] = tokens[chunk[0]]
				continue
			}
			for _, app := range chunk {
				if _, err := e.transferBatch(ctx, to, []int64{app}, tokens); err != nil {
					e.logger.Debug("handover write failed; deleting the key instead", "app_id", app, "successor", id, "error", err)
					left[app] = tokens[app]
				}
			}
		}
	}
	return left
}

// handoverTarget is what a handover needs to know about the server it
// writes for: its membership key, its lease, the TTL it was granted, and
// its endpoints.
type handoverTarget struct {
	member string
	lease  clientv3.LeaseID
	record coord.OwnerRecord // without HandedOverFrom
}

// isMember is the compare that proves the target still a member under
// the lease it was read with: a server that has left membership (it is
// draining) is given nothing, even while its lease lives on.
func (t handoverTarget) isMember() clientv3.Cmp {
	return clientv3.Compare(clientv3.LeaseValue(t.member), "=", t.lease)
}

// handoverTarget reads server id's membership key (its lease and
// endpoints) and the TTL etcd granted that lease.
func (e *Elector) handoverTarget(ctx context.Context, id string) (handoverTarget, error) {
	key, err := e.keys.Server(id)
	if err != nil {
		return handoverTarget{}, err
	}
	resp, err := e.cli.Get(ctx, key)
	if err != nil {
		return handoverTarget{}, fmt.Errorf("read membership: %w", err)
	}
	if len(resp.Kvs) == 0 || resp.Kvs[0].Lease == 0 {
		return handoverTarget{}, errors.New("not a member any more")
	}
	srv, err := coord.DecodeServerRecord(resp.Kvs[0].Value)
	if err != nil {
		return handoverTarget{}, err
	}
	lease := clientv3.LeaseID(resp.Kvs[0].Lease)
	ttl, err := e.cli.TimeToLive(ctx, lease)
	if err != nil {
		return handoverTarget{}, fmt.Errorf("read its lease: %w", err)
	}
	if ttl.TTL < 0 || ttl.GrantedTTL <= 0 { // TTL is whole seconds left; -1 once expired
		return handoverTarget{}, errors.New("its lease has expired")
	}
	return handoverTarget{member: key, lease: lease, record: coord.OwnerRecord{
		ServerID:   id,
		Control:    srv.Control,
		Protocols:  srv.Protocols,
		TTLMillis:  ttl.GrantedTTL * 1000,
		AcquiredAt: time.Now().UTC(),
	}}, nil
}

// transferBatch writes to's owner record for every app in apps in one
// Txn, each guarded by its token, and by to's membership (to.isMember)
// and any further guards. It returns the Txn's revision with its error
// (errGuardFailed when a compare failed).
func (e *Elector) transferBatch(ctx context.Context, to handoverTarget, apps []int64, tokens map[int64]int64, guards ...clientv3.Cmp) (int64, error) {
	cmps := append([]clientv3.Cmp{to.isMember()}, guards...)
	var ops []clientv3.Op
	for _, app := range apps {
		rec := to.record
		rec.HandedOverFrom = tokens[app]
		val, err := rec.Encode()
		if err != nil {
			return 0, err
		}
		key := e.keys.Owner(app)
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(key), "=", tokens[app]))
		ops = append(ops, clientv3.OpPut(key, string(val), clientv3.WithLease(to.lease)))
	}
	resp, err := e.cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
	if err != nil {
		return 0, err
	}
	if !resp.Succeeded {
		return resp.Header.Revision, errGuardFailed
	}
	return resp.Header.Revision, nil
}

// errGuardFailed: a transfer's Txn found an owner key no longer holding
// this server's token, the target no longer a member under the lease it
// was read with, or the live-server set changed.
var errGuardFailed = errors.New("an owner key no longer holds this server's token, or the target or the live servers changed")

// waitForOthers waits until every app in tokens (app → the token this
// server gave up) is owned by another server under a newer token — an
// entry of the table older than that is a view the watch has not brought
// up to date — and returns who owns each.
func (e *Elector) waitForOthers(ctx context.Context, tokens map[int64]int64) (map[int64]string, error) {
	owners := make(map[int64]string, len(tokens))
	waiting := slices.Collect(maps.Keys(tokens))
	for {
		e.mu.Lock()
		waiting = slices.DeleteFunc(waiting, func(app int64) bool {
			k, ok := e.table[app]
			if ok && k.modRev > tokens[app] && k.rec.ServerID != e.cfg.ServerID && k.rec.ServerID != "" {
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
			return owners, fmt.Errorf("election: %d of %d apps handed over: %w", len(owners), len(tokens), ctx.Err())
		}
	}
}

// handOverAll resigns every app this server owns (Close's drain) and waits
// until other servers own them, unless no other server is alive.
func (e *Elector) handOverAll(ctx context.Context) error {
	e.mu.Lock()
	tokens := make(map[int64]int64, len(e.mine))
	until := e.cfg.clock.Now().Add(2 * e.session.TTL())
	for app, o := range e.mine {
		tokens[app] = o.token
		e.giveUp(app, o.token, until)
		e.lose(o, ReasonResigned)
	}
	e.mu.Unlock()
	// An election of this server still in flight may create a key naming
	// it after the read below, and after the drain stopped the watch that
	// would pass it on: wait for it first.
	if err := e.noElections(ctx); err != nil {
		return err
	}
	unseen, err := e.handedButUnseen(ctx, tokens)
	if err != nil {
		return err
	}
	maps.Copy(tokens, unseen)
	if len(tokens) == 0 {
		return nil
	}
	if err := e.releaseOrOwe(ctx, tokens); err != nil {
		return err
	}
	if e.successor(0, e.cfg.ServerID) == "" {
		return nil // nobody to hand over to; the keys are gone, workers will ask
	}
	if _, err = e.waitForOthers(ctx, tokens); err != nil {
		return err
	}
	return e.passOnLate(ctx, tokens)
}

// passOnLate hands on keys naming this server that appeared during the
// drain after its read of the owner keys: an election or a placement on
// this server that was in flight when the drain began (Place on another
// server read the membership before this one left it). Those the watch
// delivered are being passed on already (passOnIfUnwanted), and are
// waited for; a last read finds any it has not delivered yet.
func (e *Elector) passOnLate(ctx context.Context, done map[int64]int64) error {
	for range 2 {
		if err := waitGroupCtx(ctx, &e.passOns); err != nil {
			return err
		}
		late, err := e.handedButUnseen(ctx, done)
		if err != nil || len(late) == 0 {
			return err
		}
		maps.Copy(done, late)
		if err := e.releaseOrOwe(ctx, late); err != nil {
			return err
		}
	}
	return nil
}

// noElections waits until no election of this server is in flight
// (ensureOwner's flights), or ctx ends. An election's request that
// outlived its caller's ctx is not waited for: its key, if it lands,
// names this server until the drain's end revokes the lease.
func (e *Elector) noElections(ctx context.Context) error {
	for {
		e.mu.Lock()
		n, changed := len(e.flights), e.changed
		e.mu.Unlock()
		if n == 0 {
			return nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// waitGroupCtx waits for wg, or until ctx ends.
func waitGroupCtx(ctx context.Context, wg *sync.WaitGroup) error {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// handedButUnseen returns the apps (app → token) whose owner key names
// this server under its current lease and which are not in known: keys
// handed or placed on it, or written by its own elections, that its watch
// has not shown yet. A server that drains just after a peer handed or
// placed it an app (its watch can lag by milliseconds, or by its catch-up
// after a restart) would otherwise leave that app's key naming it, with
// nobody acting, until its lease ends.
func (e *Elector) handedButUnseen(ctx context.Context, known map[int64]int64) (map[int64]int64, error) {
	resp, err := e.cli.Get(ctx, e.keys.OwnerPrefix(), clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("election: read owner keys before handing over: %w", err)
	}
	lease := e.session.Lease()
	unseen := map[int64]int64{}
	for _, kv := range resp.Kvs {
		if clientv3.LeaseID(kv.Lease) != lease {
			continue
		}
		app, err := e.keys.AppIDFromOwnerKey(string(kv.Key))
		if err != nil {
			continue
		}
		if _, ok := known[app]; ok {
			continue
		}
		if rec, err := coord.DecodeOwnerRecord(kv.Value); err == nil && rec.ServerID == e.cfg.ServerID {
			unseen[app] = kv.ModRevision
		}
	}
	return unseen, nil
}

// giveUp marks app as given up by this server: it does not elect itself
// for the app until until, and never owns token again (see
// Elector.released). Called with e.mu held, before the release of the
// key under token is sent.
func (e *Elector) giveUp(app, token int64, until time.Time) {
	e.resigning[app] = until
	e.released[app] = max(e.released[app], token)
}

// handingOver reports whether this server is giving app away (resigning
// from it, or a release of its key may still be on its way); if so it
// returns the server workers should be sent to instead (the successor
// among the others), so that this server never elects itself back.
func (e *Elector) handingOver(app int64) (owner, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	until, ok := e.resigning[app]
	if !e.draining && (!ok || !e.cfg.clock.Now().Before(until)) {
		delete(e.resigning, app)
		if _, released := e.released[app]; !released {
			return owner{}, false
		}
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
	return e.draining || ok && e.cfg.clock.Now().Before(until)
}
