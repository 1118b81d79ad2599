package election

import (
	"context"
	"fmt"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// mutexes builds the per-app concurrency.Mutex values on the server's one
// lease. concurrency.Mutex needs a concurrency.Session only as a holder of
// the client and the lease id; a concurrency.Session also keeps its lease
// alive, which baton's own Session does, so the one made here has its
// keepalive context cancelled at once. Callers use at most one Mutex per
// app at a time (elections are coalesced per app): two Mutex values on one
// lease and prefix would share one key and both "hold" it.
type mutexes struct {
	cli *clientv3.Client

	mu    sync.Mutex
	lease clientv3.LeaseID
	cs    *concurrency.Session
}

func newMutexes(cli *clientv3.Client) *mutexes { return &mutexes{cli: cli} }

// lock acquires the mutex under prefix with lease, bounded by ctx.
func (m *mutexes) lock(ctx context.Context, lease clientv3.LeaseID, prefix string) (*concurrency.Mutex, error) {
	cs, err := m.session(lease)
	if err != nil {
		return nil, err
	}
	mx := concurrency.NewMutex(cs, prefix)
	if err := mx.Lock(ctx); err != nil {
		return nil, fmt.Errorf("election: lock %s: %w", prefix, err)
	}
	return mx, nil
}

func (m *mutexes) session(lease clientv3.LeaseID) (*concurrency.Session, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cs != nil && m.lease == lease {
		return m.cs, nil
	}
	stopped, stop := context.WithCancel(context.Background())
	stop()
	cs, err := concurrency.NewSession(m.cli, concurrency.WithLease(lease), concurrency.WithContext(stopped))
	if err != nil {
		return nil, fmt.Errorf("election: mutex session: %w", err)
	}
	m.lease, m.cs = lease, cs
	return cs, nil
}

// unlock releases mx with a Txn guarded by IsOwner, never with
// Mutex.Unlock: that is an unconditional delete, and a retried one can
// delete a newer holder's key (etcd issue 22082). If this server no longer
// holds the lock, nothing is deleted.
func (m *mutexes) unlock(mx *concurrency.Mutex) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err := m.cli.Txn(ctx).If(mx.IsOwner()).Then(clientv3.OpDelete(mx.Key())).Commit()
	return err
}
