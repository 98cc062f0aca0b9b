CREATE TABLE IF NOT EXISTS customers (id text PRIMARY KEY);
CREATE TABLE IF NOT EXISTS orders (
    id         text PRIMARY KEY,
    customer   text NOT NULL,
    item       text NOT NULL,
    quantity   integer NOT NULL CHECK (quantity > 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    -- Checked at COMMIT/PREPARE time, so an order for an unknown customer is refused by
    -- PREPARE TRANSACTION: the branch votes no and the transaction aborts.
    CONSTRAINT orders_customer_fk FOREIGN KEY (customer) REFERENCES customers (id)
        DEFERRABLE INITIALLY DEFERRED
);
