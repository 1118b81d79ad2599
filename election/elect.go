package election

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/backoff"
)

// Elect returns the address of app's owner for protocol, electing this
// server if the app has no live owner — PowerJob's getServer0, made safe.
//
//  1. A protocol this server does not speak gives ErrProtocol.
//  2. If this server owns the app (its table, kept by its watch and
//     guard), its own address, with no etcd request.
//  3. Otherwise one Txn creates this server's owner key if it is absent
//     (compare ModRevision 0) and the app registered, or else reads the
//     key (with the app record, the first time: an unregistered app
//     gives ErrUnknownApp). An election of an app nobody owns ends here:
//     one request, one raft commit. A foreign owner is pinged, and if it
//     answers and speaks the protocol its address is returned.
//  4. Otherwise (the owner is gone or silent) the app's mutex is locked,
//     and this server's owner record written over the key, and the
//     mutex released, in one Txn guarded by the mutex and the
//     ModRevision read in step 3: if anyone elected meanwhile the Txn
//     fails and the next attempt finds them.
//  5. Contention is retried RetryTimes times with jittered backoff, then
//     ErrElectionFailed wraps the last cause.
//
// currentServer, the address the worker uses now, is accepted for
// compatibility with PowerJob's request and logged, never trusted.
// Concurrent calls for one app on one server share one election. Elect
// fails with ErrNotReady while this server's guard is unconfirmed. It
// blocks until it has an answer or ctx ends.
//
// An answer naming this server says where workers must go; this server
// acts for the app from OnAcquire on (Ownership and Fence report it from
// then), once its own watch has shown the write and no displaced owner
// can still be acting — usually milliseconds later.
func (e *Elector) Elect(ctx context.Context, app int64, protocol, currentServer string) (string, error) {
	return e.answer(ctx, app, protocol, currentServer, false)
}

// Place is Elect, except that an app with no live owner goes to its
// preferred live server — the first by coord.RankWeighted over the live
// servers' placement weights that answers a ping — rather than to this
// one: this server writes that server's owner record, bound to that
// server's lease, under the app's mutex, in the same Txn Elect would
// write its own (see the package doc, "Placement"). The answer is the
// placed server's address at once. A server that does not answer is
// skipped for the next by rank; this server comes last only if no other
// answers before it in rank. Workers' acquires use it when the node
// balances (server.Config.Balance).
func (e *Elector) Place(ctx context.Context, app int64, protocol, currentServer string) (string, error) {
	return e.answer(ctx, app, protocol, currentServer, true)
}

func (e *Elector) answer(ctx context.Context, app int64, protocol, currentServer string, place bool) (string, error) {
	if e == nil {
		return "", errNotStarted
	}
	if _, ok := e.cfg.Protocols[protocol]; !ok {
		return "", fmt.Errorf("%w: %q (this server speaks %v)", ErrProtocol, protocol, e.protocolNames())
	}
	if err := e.session.Check(); err != nil {
		return "", fmt.Errorf("%w: %w", ErrNotReady, err)
	}
	e.mu.Lock()
	closed, o := e.closed, e.mine[app]
	e.mu.Unlock()
	if closed {
		return "", ErrClosed
	}
	if o != nil {
		return workerAddress(e.cfg.Protocols, protocol), nil
	}
	if e.unknownRecently(app) {
		return "", fmt.Errorf("%w: %d", ErrUnknownApp, app)
	}
	owner, err := e.ensureOwner(ctx, app, place)
	if err != nil {
		return "", err
	}
	addr := workerAddress(owner.protocols, protocol)
	if addr == "" {
		return "", fmt.Errorf("%w: app %d's owner %s does not speak %q", ErrProtocol, app, owner.serverID, protocol)
	}
	if currentServer != "" && currentServer != addr {
		e.logger.Debug("worker is pointed elsewhere", "app_id", app, "current_server", currentServer, "owner", addr)
	}
	return addr, nil
}

// workerAddress is where a worker reaches a server for protocol: the
// external address when one is set (NAT), else the address; "" when the
// server does not offer protocol.
func workerAddress(p coord.Protocols, protocol string) string {
	return p[protocol].ForWorkers()
}

func (e *Elector) protocolNames() []string {
	names := make([]string, 0, len(e.cfg.Protocols))
	for name := range e.cfg.Protocols {
		names = append(names, name)
	}
	return names
}

// readOwner reads app's owner key and, until app is known to be
// registered, its app record, in one Txn: an unregistered app gives
// ErrUnknownApp. Apps are never deleted, so a positive answer is
// remembered. With create (the put of this server's owner record) the
// same Txn first creates the key if it is absent — compare ModRevision 0,
// as an election's own create — and the app registered, and returns the
// revision it created it at; otherwise (0) it reads as without: an
// election of an app nobody owns is then one request and one commit.
func (e *Elector) readOwner(ctx context.Context, app int64, create *clientv3.Op) (kv *mvccpb.KeyValue, created int64, err error) {
	e.mu.Lock()
	known := e.known[app]
	e.mu.Unlock()
	key := e.keys.Owner(app)
	reads := []clientv3.Op{clientv3.OpGet(key)}
	cmps := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", 0)}
	if !known {
		reads = append(reads, clientv3.OpGet(e.keys.AppID(app)))
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(e.keys.AppID(app)), ">", 0))
	}
	txn := e.cli.Txn(ctx)
	if create != nil {
		// The create also reads the app record, to check that it can
		// be decoded: one baton cannot read (corrupt, or a newer
		// version's) gets no owner.
		then := []clientv3.Op{*create}
		if !known {
			then = append(then, clientv3.OpGet(e.keys.AppID(app)))
		}
		txn = txn.If(cmps...).Then(then...).Else(reads...)
	} else {
		txn = txn.Then(reads...)
	}
	resp, err := txn.Commit()
	if err != nil {
		return nil, 0, fmt.Errorf("read owner key: %w", err)
	}
	if create != nil && resp.Succeeded {
		if !known {
			if err := registered(app, resp.Responses[1].GetResponseRange().Kvs); err != nil {
				return nil, 0, e.undoCreate(ctx, app, resp.Header.Revision, err)
			}
		}
		e.mu.Lock()
		e.known[app] = true
		e.mu.Unlock()
		return nil, resp.Header.Revision, nil
	}
	if !known {
		if err := registered(app, resp.Responses[1].GetResponseRange().Kvs); err != nil {
			if errors.Is(err, ErrUnknownApp) {
				e.markUnknown(app)
			}
			return nil, 0, err
		}
		e.mu.Lock()
		e.known[app] = true
		e.mu.Unlock()
	}
	if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
		return kvs[0], 0, nil
	}
	return nil, 0, nil
}

// undoCreate deletes the owner key an election created at revision rev
// for an app whose record turned out unreadable (why), unless it changed
// meanwhile: this server never owned it. The election fails with why.
func (e *Elector) undoCreate(ctx context.Context, app, rev int64, why error) error {
	e.mu.Lock()
	e.released[app] = max(e.released[app], rev) // its watch must not own it either
	if o := e.mine[app]; o != nil && o.token == rev {
		e.lose(o, ReasonDeposed) // the watch was quicker
	}
	e.mu.Unlock()
	if err := e.deleteOwnerKeys(ctx, map[int64]int64{app: rev}); err != nil {
		e.logger.Warn("could not delete an owner key created for an app whose record cannot be read; it names this server, which does not act for it, until its lease ends", "app_id", app, "error", err)
	}
	return why
}

// unknownFor is how long an app id found unregistered is answered from
// memory: a worker (or an attacker) asking for an unknown id again and
// again costs one etcd read per unknownFor, not one per request, and no
// election slot. An app registered meanwhile is found after at most that
// long.
const unknownFor = time.Second

// maxUnknown bounds the memory of unknown ids; past it the memory starts
// afresh.
const maxUnknown = 4096

// markUnknown remembers that app was not registered.
func (e *Elector) markUnknown(app int64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if len(e.unknown) >= maxUnknown {
		clear(e.unknown)
	}
	e.unknown[app] = e.cfg.clock.Now().Add(unknownFor)
}

// unknownRecently reports whether app was found unregistered less than
// unknownFor ago.
func (e *Elector) unknownRecently(app int64) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	until, ok := e.unknown[app]
	if ok && !e.cfg.clock.Now().Before(until) {
		delete(e.unknown, app)
		return false
	}
	return ok
}

// owner is the answer of an election: who owns the app and where it
// answers.
type owner struct {
	serverID  string
	protocols coord.Protocols
	placed    bool // written by this server for another (Place)
}

// flight is one election in progress; concurrent callers for the same app
// wait for it instead of running their own.
type flight struct {
	done  chan struct{}
	owner owner
	err   error
}

// ensureOwner returns app's live owner, electing this server (with place,
// the app's preferred live server) if there is none, coalescing
// concurrent calls for the same app.
func (e *Elector) ensureOwner(ctx context.Context, app int64, place bool) (owner, error) {
	for {
		e.mu.Lock()
		f := e.flights[app]
		if f == nil {
			f = &flight{done: make(chan struct{})}
			e.flights[app] = f
			e.mu.Unlock()
			f.owner, f.err = e.electInTurn(ctx, app, place)
			e.mu.Lock()
			delete(e.flights, app)
			if e.draining {
				e.tableChangedLocked() // a drain may wait for the last flight (noElections)
			}
			e.mu.Unlock()
			close(f.done)
			return f.owner, f.err
		}
		e.mu.Unlock()
		select {
		case <-f.done:
		case <-ctx.Done():
			return owner{}, ctx.Err()
		}
		// The leader's ctx may have ended without ours: run our own.
		if f.err != nil && (errors.Is(f.err, context.Canceled) || errors.Is(f.err, context.DeadlineExceeded)) && ctx.Err() == nil {
			continue
		}
		return f.owner, f.err
	}
}

// electInTurn runs elect once one of the ElectionConcurrency slots is
// free.
func (e *Elector) electInTurn(ctx context.Context, app int64, place bool) (owner, error) {
	select {
	case e.slots <- struct{}{}:
		defer func() { <-e.slots }()
	case <-ctx.Done():
		return owner{}, ctx.Err()
	}
	return e.elect(ctx, app, place)
}

// elect runs the election proper, with retries.
func (e *Elector) elect(ctx context.Context, app int64, place bool) (owner, error) {
	down := map[string]bool{} // servers that did not answer a ping in this election
	var last error
	for attempt := 0; attempt < e.cfg.RetryTimes; attempt++ {
		if attempt > 0 {
			if err := backoff.Sleep(ctx, backoff.Jittered(attempt-1, e.cfg.RetryBase, time.Second)); err != nil {
				return owner{}, err
			}
		}
		o, done, err := e.attempt(ctx, app, down, place)
		if done {
			if err == nil {
				switch {
				case o.placed:
					e.metrics.election("placed")
				case o.serverID == e.cfg.ServerID:
					e.metrics.election("won")
				default:
					e.metrics.election("other_owner")
				}
			}
			return o, err
		}
		last = err
		e.logger.Debug("election attempt failed", "app_id", app, "attempt", attempt+1, "error", err)
		if ctx.Err() != nil {
			return owner{}, ctx.Err()
		}
	}
	e.metrics.election("failed")
	return owner{}, fmt.Errorf("%w: app %d after %d attempts: %w", ErrElectionFailed, app, e.cfg.RetryTimes, last)
}

// attempt makes one election attempt. done says whether its result is
// final; otherwise err is a contention or transient failure to retry.
func (e *Elector) attempt(ctx context.Context, app int64, down map[string]bool, place bool) (o owner, done bool, err error) {
	if err := e.session.Check(); err != nil {
		return owner{}, true, fmt.Errorf("%w: %w", ErrNotReady, err)
	}
	key := e.keys.Owner(app)
	// An election of this server (not a placement, not while it gives
	// the app away) creates an absent key in the read's own Txn.
	var create *clientv3.Op
	createLease := e.session.Lease()
	if _, handing := e.handingOver(app); !place && !handing {
		val, err := e.ownRecord().Encode()
		if err != nil {
			return owner{}, true, err
		}
		op := clientv3.OpPut(key, string(val), clientv3.WithLease(createLease))
		create = &op
	}
	kv, created, err := e.readOwner(ctx, app, create)
	if errors.Is(err, ErrUnknownApp) {
		return owner{}, true, err
	}
	if err != nil {
		return owner{}, false, err
	}
	if created != 0 {
		return e.elected(app, created, createLease, 0, false), true, nil
	}
	var readRev int64
	var displace []clientv3.Op // the marker, when overwriting a live key
	if kv != nil {
		readRev = kv.ModRevision
		if o, alive := e.liveOwner(ctx, app, kv.Value, clientv3.LeaseID(kv.Lease), down); alive {
			if o.serverID == e.cfg.ServerID {
				// Written by this process, or handed to it; make sure
				// the table knows (a no-op when it does). It acts only
				// once the table shows the key and no marker. A key it
				// is giving away sends workers to where it is going.
				if h, ok := e.handingOver(app); ok {
					return h, true, nil
				}
				e.mu.Lock()
				e.tryActivate(e.own(app, kv.ModRevision, clientv3.LeaseID(kv.Lease)))
				e.mu.Unlock()
			}
			return o, true, nil
		}
		if kv.Lease != 0 {
			// Its lease is alive (the key exists): its owner may be
			// acting until its guard fires. The marker makes everyone,
			// this server included, wait until that owner has stopped.
			prev, _ := coord.DecodeOwnerRecord(kv.Value) // empty ServerID if corrupt
			op, err := e.markerOp(app, prev.ServerID, clientv3.LeaseID(kv.Lease), kv.ModRevision)
			if err != nil {
				return owner{}, true, err
			}
			displace = append(displace, op)
		}
	}
	if o, ok := e.handingOver(app); ok {
		return o, true, nil
	}
	var elsewhere *handoverTarget // with place: the preferred live server, when not this one
	if place {
		elsewhere = e.preferredElsewhere(ctx, app, down)
	}

	lease := e.session.Lease()
	// Only overwriting a key that exists takes the app's mutex: a key read
	// absent is created with the compare ModRevision = 0, which only one
	// contender can pass, so there is nobody to queue behind (see the
	// package doc, "Ownership").
	cmps := []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", readRev)}
	var unlock []clientv3.Op
	released := true
	if kv != nil {
		lctx, cancel := context.WithTimeout(ctx, e.cfg.LockTimeout)
		defer cancel()
		mx, err := e.mutexes.lock(lctx, lease, e.keys.Lock(app))
		if err != nil {
			return owner{}, false, err
		}
		released = false
		defer func() {
			if released {
				return
			}
			e.mutexes.release(mx)
		}()
		cmps = append(cmps, mx.IsOwner())
		unlock = []clientv3.Op{clientv3.OpDelete(mx.Key())}
	}
	if err := e.session.Check(); err != nil {
		return owner{}, true, fmt.Errorf("%w: %w", ErrNotReady, err)
	}
	rec := e.ownRecord()
	ownerLease := lease
	if elsewhere != nil {
		rec, ownerLease = elsewhere.record, elsewhere.lease
		cmps = append(cmps, elsewhere.isMember())
	}
	val, err := rec.Encode()
	if err != nil {
		return owner{}, true, err
	}
	// The key must still be what was read before the lock (anyone who
	// elected meanwhile changed it: retry, and find them); the lock is
	// released in the same Txn, and the displaced owner's marker written
	// in it. The compare also proves the displaced lease still exists:
	// the key is bound to it. A placed owner must still be a member under
	// the lease its record is bound to.
	ops := append([]clientv3.Op{clientv3.OpPut(key, string(val), clientv3.WithLease(ownerLease))}, unlock...)
	txn, err := e.cli.Txn(ctx).If(cmps...).Then(append(ops, displace...)...).Commit()
	if err != nil {
		return owner{}, false, fmt.Errorf("write owner key: %w", err)
	}
	if !txn.Succeeded {
		return owner{}, false, errors.New("lost the mutex, the owner key changed since it was read, or the placed server left")
	}
	released = true
	if elsewhere != nil {
		e.logger.Debug("placed", "app_id", app, "owner", rec.ServerID, "token", txn.Header.Revision, "displaced", len(displace) > 0)
		return owner{serverID: rec.ServerID, protocols: rec.Protocols, placed: true}, true, nil
	}
	return e.elected(app, txn.Header.Revision, lease, readRev, len(displace) > 0), true, nil
}

// ownRecord is the owner record of this server, acquired now.
func (e *Elector) ownRecord() coord.OwnerRecord {
	return coord.OwnerRecord{
		ServerID:   e.cfg.ServerID,
		Control:    e.cfg.Control,
		Protocols:  e.cfg.Protocols,
		TTLMillis:  e.session.TTL().Milliseconds(),
		AcquiredAt: time.Now().UTC(),
	}
}

// elected owns app under token, the revision this server's election wrote
// its key at (over readRev, 0 when it created it), and answers with this
// server.
func (e *Elector) elected(app, token int64, lease clientv3.LeaseID, readRev int64, displaced bool) owner {
	e.mu.Lock()
	e.tryActivate(e.own(app, token, lease))
	e.mu.Unlock()
	e.logger.Debug("elected", "app_id", app, "token", token, "overwrote", readRev != 0, "displaced", displaced)
	return owner{serverID: e.cfg.ServerID, protocols: e.cfg.Protocols}
}

// liveOwner decides whether the owner recorded in val is alive: this
// server under its current lease always is; another server is if it
// answers a ping (or, with no Pinger, if its key exists at all).
func (e *Elector) liveOwner(ctx context.Context, app int64, val []byte, lease clientv3.LeaseID, down map[string]bool) (owner, bool) {
	rec, err := coord.DecodeOwnerRecord(val)
	if err != nil {
		e.logger.Warn("owner key holds a corrupt record; electing over it", "app_id", app, "error", err)
		return owner{}, false
	}
	if rec.ServerID == e.cfg.ServerID {
		// Ours, under the current lease: written by this process (the
		// table may not show it yet). Under an older lease it cannot
		// exist: that lease's keys went with it.
		return owner{serverID: rec.ServerID, protocols: e.cfg.Protocols}, lease == e.session.Lease()
	}
	if e.cfg.Pinger == nil {
		return owner{serverID: rec.ServerID, protocols: rec.Protocols}, true
	}
	if down[rec.ServerID] || e.unanswered.recently(rec.ServerID, e.cfg.clock.Now()) {
		return owner{}, false
	}
	pctx, cancel := context.WithTimeout(ctx, e.cfg.PingTimeout)
	defer cancel()
	reply, err := e.cfg.Pinger.Ping(pctx, rec.ServerID, rec.Control)
	if err != nil {
		e.logger.Info("owner did not answer a ping", "app_id", app, "owner", rec.ServerID, "error", err)
		down[rec.ServerID] = true
		e.unanswered.mark(rec.ServerID, e.cfg.clock.Now().Add(e.cfg.PingTimeout))
		return owner{}, false
	}
	e.unanswered.clear(rec.ServerID)
	return owner{serverID: rec.ServerID, protocols: reply.Protocols}, true
}

// registered interprets the read of app's record (its app-by-id key):
// ErrUnknownApp if there is none, an error if it cannot be decoded.
func registered(app int64, kvs []*mvccpb.KeyValue) error {
	if app <= 0 || len(kvs) == 0 {
		return fmt.Errorf("%w: id %d", ErrUnknownApp, app)
	}
	if _, err := coord.DecodeAppRecord(kvs[0].Value); err != nil {
		return fmt.Errorf("app %d record: %w", app, err)
	}
	return nil
}
