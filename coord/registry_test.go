package coord_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/batonhq/baton/coord"
	"github.com/batonhq/baton/internal/keyspace"
	"github.com/batonhq/baton/internal/testutil"
)

func TestRegistryConcurrentRegistrationGivesOneIDPerName(t *testing.T) {
	e := testutil.Etcd(t, 1)
	keys, _ := keyspace.New("/reg")
	reg, _ := coord.NewRegistry(e.Client(), keys.Prefix())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	var mu sync.Mutex
	idsByName := map[string]map[int64]bool{}
	var wg sync.WaitGroup
	for g := 0; g < 50; g++ {
		wg.Go(func() {
			for i := 0; i < 10; i++ {
				name := fmt.Sprintf("app-%d", (g+i)%10)
				rec, err := reg.Register(ctx, name)
				if err != nil {
					t.Errorf("register %s: %v", name, err)
					return
				}
				mu.Lock()
				if idsByName[name] == nil {
					idsByName[name] = map[int64]bool{}
				}
				idsByName[name][rec.ID] = true
				mu.Unlock()
			}
		})
	}
	wg.Wait()

	seen := map[int64]string{}
	for name, ids := range idsByName {
		if len(ids) != 1 {
			t.Errorf("%s got %d ids: %v", name, len(ids), ids)
		}
		for id := range ids {
			if id <= 0 {
				t.Errorf("%s got id %d", name, id)
			}
			if other, dup := seen[id]; dup {
				t.Errorf("id %d given to %s and %s", id, name, other)
			}
			seen[id] = name
		}
	}
	apps, err := reg.List(ctx)
	if err != nil || len(apps) != 10 {
		t.Fatalf("List = %d apps, %v; want 10", len(apps), err)
	}
	for _, app := range apps {
		byID, err := reg.ByID(ctx, app.ID)
		if err != nil || byID.Name != app.Name {
			t.Errorf("ByID(%d) = %+v, %v", app.ID, byID, err)
		}
		byName, err := reg.ByName(ctx, app.Name)
		if err != nil || byName.ID != app.ID {
			t.Errorf("ByName(%s) = %+v, %v", app.Name, byName, err)
		}
	}
	// The sequence ends at the highest id: no id was allocated and lost.
	seq, _ := e.Client().Get(ctx, keys.AppSeq())
	if string(seq.Kvs[0].Value) != "10" {
		t.Errorf("apps/seq = %s, want 10", seq.Kvs[0].Value)
	}
}

func TestRegistryRefusesBadInputAndWritesNothing(t *testing.T) {
	e := testutil.Etcd(t, 1)
	keys, _ := keyspace.New("/reg")
	reg, _ := coord.NewRegistry(e.Client(), keys.Prefix())
	ctx := context.Background()

	for _, name := range []string{"", string(make([]byte, 200)), "a\nb", "\xff"} {
		if _, err := reg.Register(ctx, name); !errors.Is(err, coord.ErrInvalidAppName) {
			t.Errorf("Register(%q) = %v, want ErrInvalidAppName", name, err)
		}
	}
	if _, err := reg.ByName(ctx, "missing"); !errors.Is(err, coord.ErrUnknownApp) {
		t.Errorf("ByName(missing) = %v", err)
	}
	if _, err := reg.ByID(ctx, 99); !errors.Is(err, coord.ErrUnknownApp) {
		t.Errorf("ByID(99) = %v", err)
	}
	if _, err := reg.ByID(ctx, -1); !errors.Is(err, coord.ErrUnknownApp) {
		t.Errorf("ByID(-1) = %v", err)
	}
	all, _ := e.Client().Get(ctx, "", clientv3.WithPrefix(), clientv3.WithCountOnly())
	if all.Count != 0 {
		t.Errorf("bad input wrote %d keys", all.Count)
	}
}

func TestRegistryReportsCorruptRecords(t *testing.T) {
	e := testutil.Etcd(t, 1)
	keys, _ := keyspace.New("")
	reg, _ := coord.NewRegistry(e.Client(), keys.Prefix())
	ctx := context.Background()
	nameKey, _ := keys.AppName("x")
	e.Client().Put(ctx, nameKey, "{not json")
	if _, err := reg.Register(ctx, "x"); !errors.Is(err, coord.ErrCorruptRecord) {
		t.Errorf("Register over a corrupt record = %v", err)
	}
	e.Client().Put(ctx, keys.AppSeq(), "minus one")
	if _, err := reg.Register(ctx, "y"); !errors.Is(err, coord.ErrCorruptRecord) {
		t.Errorf("Register with a corrupt sequence = %v", err)
	}
}
