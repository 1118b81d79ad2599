package coord

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"time"

	"github.com/batonhq/baton/internal/keyspace"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Registry maps app names to app ids, as PowerJob's app_info table does.
// Ids are positive, never reused, and allocated by a compare-and-swap on
// the apps/seq key, so any number of servers may register concurrently.
// A Registry is safe for concurrent use; it never closes the client.
type Registry struct {
	cli  *clientv3.Client
	keys keyspace.Keys
	now  func() time.Time
}

// NewRegistry returns the registry stored under prefix ("" means
// DefaultPrefix). It fails only for an invalid prefix (ErrInvalidPrefix).
func NewRegistry(cli *clientv3.Client, prefix string) (*Registry, error) {
	keys, err := keyspace.New(prefix)
	if err != nil {
		return nil, err
	}
	return &Registry{cli: cli, keys: keys, now: time.Now}, nil
}

// Register returns the id of the app called name, allocating one if the
// name is new. Registering an existing name returns its id and writes
// nothing. Invalid names fail with ErrInvalidAppName. It blocks until etcd
// answers or ctx ends.
func (r *Registry) Register(ctx context.Context, name string) (AppRecord, error) {
	nameKey, err := r.keys.AppName(name)
	if err != nil {
		return AppRecord{}, err
	}
	for {
		// One read gives both the name (already registered?) and the
		// sequence to compare against.
		resp, err := r.cli.Txn(ctx).Then(
			clientv3.OpGet(nameKey),
			clientv3.OpGet(r.keys.AppSeq()),
		).Commit()
		if err != nil {
			return AppRecord{}, fmt.Errorf("coord: register app %q: %w", name, err)
		}
		if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
			return decodeApp(kvs[0].Key, kvs[0].Value)
		}
		last, seqRev, err := r.parseSeq(resp.Responses[1].GetResponseRange().Kvs)
		if err != nil {
			return AppRecord{}, err
		}
		rec := AppRecord{ID: last + 1, Name: name, CreatedAt: r.now().UTC()}
		val, err := rec.Encode()
		if err != nil {
			return AppRecord{}, err
		}
		put, err := r.cli.Txn(ctx).If(
			clientv3.Compare(clientv3.CreateRevision(nameKey), "=", 0),
			clientv3.Compare(clientv3.ModRevision(r.keys.AppSeq()), "=", seqRev),
		).Then(
			clientv3.OpPut(r.keys.AppSeq(), strconv.FormatInt(rec.ID, 10)),
			clientv3.OpPut(nameKey, string(val)),
			clientv3.OpPut(r.keys.AppID(rec.ID), string(val)),
		).Commit()
		if err != nil {
			return AppRecord{}, fmt.Errorf("coord: register app %q: %w", name, err)
		}
		if put.Succeeded {
			rec.Version = RecordVersion
			return rec, nil
		}
		// Someone registered this name or another one meanwhile: read
		// again. Each failed attempt means another registration
		// succeeded, so this loop makes progress.
		if err := ctx.Err(); err != nil {
			return AppRecord{}, err
		}
	}
}

func (r *Registry) parseSeq(kvs []*mvccpb.KeyValue) (last, modRev int64, err error) {
	if len(kvs) == 0 {
		return 0, 0, nil
	}
	last, err = strconv.ParseInt(string(kvs[0].Value), 10, 64)
	if err != nil || last < 0 {
		return 0, 0, fmt.Errorf("%w: %s holds %q, not an app id", ErrCorruptRecord, r.keys.AppSeq(), kvs[0].Value)
	}
	return last, kvs[0].ModRevision, nil
}

// ByName returns the app registered under name, or ErrUnknownApp.
func (r *Registry) ByName(ctx context.Context, name string) (AppRecord, error) {
	key, err := r.keys.AppName(name)
	if err != nil {
		return AppRecord{}, err
	}
	return r.get(ctx, key, fmt.Sprintf("name %q", name))
}

// ByID returns the app registered under id, or ErrUnknownApp.
func (r *Registry) ByID(ctx context.Context, id int64) (AppRecord, error) {
	if id <= 0 {
		return AppRecord{}, fmt.Errorf("%w: id %d is not positive", ErrUnknownApp, id)
	}
	return r.get(ctx, r.keys.AppID(id), fmt.Sprintf("id %d", id))
}

// ByIDOp is the read ByID makes, for a caller that batches it with other
// reads in one Txn; ByIDResult interprets its answer as ByID would.
func (r *Registry) ByIDOp(id int64) clientv3.Op { return clientv3.OpGet(r.keys.AppID(id)) }

// ByIDResult is ByID's answer from the kvs that ByIDOp read.
func (r *Registry) ByIDResult(id int64, kvs []*mvccpb.KeyValue) (AppRecord, error) {
	if id <= 0 || len(kvs) == 0 {
		return AppRecord{}, fmt.Errorf("%w: id %d", ErrUnknownApp, id)
	}
	return decodeApp(kvs[0].Key, kvs[0].Value)
}

func (r *Registry) get(ctx context.Context, key, what string) (AppRecord, error) {
	resp, err := r.cli.Get(ctx, key)
	if err != nil {
		return AppRecord{}, fmt.Errorf("coord: look up app %s: %w", what, err)
	}
	if len(resp.Kvs) == 0 {
		return AppRecord{}, fmt.Errorf("%w: %s", ErrUnknownApp, what)
	}
	return decodeApp(resp.Kvs[0].Key, resp.Kvs[0].Value)
}

// List returns every registered app, ordered by id.
func (r *Registry) List(ctx context.Context) ([]AppRecord, error) {
	resp, err := r.cli.Get(ctx, r.keys.AppIDPrefix(), clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("coord: list apps: %w", err)
	}
	apps := make([]AppRecord, 0, len(resp.Kvs))
	var errs []error
	for _, kv := range resp.Kvs {
		rec, err := decodeApp(kv.Key, kv.Value)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		apps = append(apps, rec)
	}
	sort.Slice(apps, func(i, j int) bool { return apps[i].ID < apps[j].ID })
	return apps, errors.Join(errs...)
}

func decodeApp(key, val []byte) (AppRecord, error) {
	rec, err := DecodeAppRecord(val)
	if err != nil {
		return AppRecord{}, fmt.Errorf("key %s: %w", key, err)
	}
	return rec, nil
}
