package election

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// errLockKeyGone: the lease that held this server's place in an app's
// mutex queue expired while it waited.
var errLockKeyGone = errors.New("election: mutex key gone while waiting (lease expired)")

// mutexes runs the per-app mutexes on the server's one lease, with the
// key layout and queueing of etcd's concurrency.Mutex: a waiter puts
// {prefix}{leaseHex} bound to its lease, and the key with the oldest
// CreateRevision under the prefix holds the lock. baton runs the recipe
// itself rather than through concurrency.Mutex because every request
// must have a deadline: when concurrency.Mutex.Lock's wait fails it
// deletes its key with the client's own context, which has none, and
// blocks for as long as etcd is unreachable (and Close with it).
//
// Callers use at most one lock per app at a time (elections are
// coalesced per app): two waiters on one lease and prefix would share one
// key and both "hold" it.
type mutexes struct {
	cli *clientv3.Client
	// ctx bounds releases, which also run after the caller's ctx ended:
	// the elector's lifetime.
	ctx    context.Context
	logger hclog.Logger

	mu       sync.Mutex
	closed   bool
	releases sync.WaitGroup // background releases; close waits for them
}

// appLock is a held mutex.
type appLock struct {
	key string
	rev int64 // the key's CreateRevision
}

// IsOwner holds in a Txn while this server still holds the lock.
func (l appLock) IsOwner() clientv3.Cmp {
	return clientv3.Compare(clientv3.CreateRevision(l.key), "=", l.rev)
}

// Key is the lock's key, for releasing it inside a Txn.
func (l appLock) Key() string { return l.key }

// lock acquires the mutex under prefix with lease, bounded by ctx. On
// failure it releases its place in the queue (bounded too).
func (m *mutexes) lock(ctx context.Context, lease clientv3.LeaseID, prefix string) (appLock, error) {
	l := appLock{key: fmt.Sprintf("%s%x", prefix, lease)}
	first := clientv3.OpGet(prefix, clientv3.WithFirstCreate()...)
	resp, err := m.cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(l.key), "=", 0)).
		Then(clientv3.OpPut(l.key, "", clientv3.WithLease(lease)), first).
		Else(clientv3.OpGet(l.key), first).Commit()
	if err != nil {
		// If the put was applied, the key is bound to this lease and the
		// next attempt finds it (the Else branch).
		return appLock{}, fmt.Errorf("election: lock %s: %w", prefix, err)
	}
	l.rev = resp.Header.Revision
	if !resp.Succeeded {
		l.rev = resp.Responses[0].GetResponseRange().Kvs[0].CreateRevision
	}
	if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) == 0 || kvs[0].CreateRevision == l.rev {
		return l, nil
	}
	if err := m.waitTurn(ctx, prefix, l); err != nil {
		m.release(l)
		return appLock{}, fmt.Errorf("election: lock %s: %w", prefix, err)
	}
	return l, nil
}

// waitTurn returns once no key older than l's is left under prefix and
// l's key still exists: each older key is waited for with a watch of its
// deletion.
func (m *mutexes) waitTurn(ctx context.Context, prefix string, l appLock) error {
	for {
		opts := append(clientv3.WithLastCreate(), clientv3.WithMaxCreateRev(l.rev-1))
		resp, err := m.cli.Get(ctx, prefix, opts...)
		if err != nil {
			return err
		}
		if len(resp.Kvs) == 0 {
			mine, err := m.cli.Get(ctx, l.key)
			if err != nil {
				return err
			}
			if len(mine.Kvs) == 0 || mine.Kvs[0].CreateRevision != l.rev {
				return errLockKeyGone
			}
			return nil
		}
		if err := waitDeleted(ctx, m.cli, string(resp.Kvs[0].Key), resp.Header.Revision+1); err != nil {
			return err
		}
	}
}

// waitDeleted returns once key is deleted at or after revision from.
func waitDeleted(ctx context.Context, cli *clientv3.Client, key string, from int64) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	for resp := range cli.Watch(wctx, key, clientv3.WithRev(from), clientv3.WithFilterPut()) {
		if err := resp.Err(); err != nil {
			return err
		}
		for _, ev := range resp.Events {
			if ev.Type == clientv3.EventTypeDelete {
				return nil
			}
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return errors.New("election: watch of a mutex key closed")
}

// release gives l up in the background, so that a caller whose ctx has
// ended returns at once: a Txn guarded by IsOwner — never an
// unconditional delete, since a retried one can delete a newer holder's
// key (etcd issue 22082) — bounded by one second and by the elector's
// life. If this server no longer holds the lock, nothing is deleted. A
// key left behind is this server's, bound to its lease: its next lock of
// the app reuses it (and a release still in flight then only costs that
// election a retry), and the lease's end removes it.
func (m *mutexes) release(l appLock) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return // closing: the lease's revoke or end releases it
	}
	m.releases.Go(func() {
		ctx, cancel := context.WithTimeout(m.ctx, time.Second)
		defer cancel()
		if _, err := m.cli.Txn(ctx).If(l.IsOwner()).Then(clientv3.OpDelete(l.Key())).Commit(); err != nil {
			m.logger.Debug("releasing an app mutex failed; its lease will release it", "key", l.Key(), "error", err)
		}
	})
}

// close stops background releases and waits for those under way (they
// end with the elector's context).
func (m *mutexes) close() {
	m.mu.Lock()
	m.closed = true
	m.mu.Unlock()
	m.releases.Wait()
}
